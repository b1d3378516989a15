"""Component names (`stem`, `blocks.5`, `adapter@3/w32`, `pos_embed@64`, `head`...): the one
grammar the model families build, the store records and the server's pages draw. Plain
strings, no torch, so light processes (the HTTP gateway) can read them."""
from __future__ import annotations


def parse_name(name: str) -> tuple[str, int | None, int | None]:
    """'adapter@3/w32' -> ('adapter', 3, 32); 'blocks.5' -> ('blocks', 5, None); 'pos_embed@64' -> ('pos_embed', 64, None)."""
    if name.startswith("blocks."):
        return "blocks", int(name.split(".", 1)[1]), None
    if name.startswith("adapter@"):
        pos, width = name[len("adapter@"):].split("/w")
        return "adapter", int(pos), int(width)
    if name.startswith("pos_embed@"):
        return "pos_embed", int(name.split("@", 1)[1]), None
    return name, None, None


def adapter_name(position: int, width: int) -> str:
    return f"adapter@{position}/w{width}"
