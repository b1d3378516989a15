"""`munet serve` and `munet predict` (registered into the `munet` command), and the
quickstart's optional serving step (`munet quickstart --serve`)."""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from munet import cli

SERVICE = "munet.server.service:Munet"
TOKEN_FILE = "api_token"


def server_env(home: str, token: str | None = None) -> dict[str, str]:
    """The environment of a server process: MUNET_* of this shell, BentoML kept to this home
    (its Prometheus multiprocess folder is per BENTOML_HOME, so two servers never share it)."""
    env = dict(os.environ)
    env["MUNET_HOME"] = home
    env.setdefault("BENTOML_HOME", str(Path(home) / "bentoml"))
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    if token:
        env["MUNET_API_TOKEN"] = token
    return env


def serve_argv(port: int, host: str, home: str) -> list[str]:
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--port", str(port), "--host", host,
            # A neutral folder: the repository root would put its own `munet/` first on sys.path.
            "--working-dir", home]


def stored_token(home: str) -> str | None:
    path = Path(home) / TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def cmd_serve(ctx: "cli.Context") -> int:
    system = ctx.system()  # fails clearly on a home without an installation
    home = system.settings.home
    ctx.close()
    token = system.settings.api_token or stored_token(home)
    a = ctx.args
    if not 0 < a.port < 65536:
        raise cli.CliError("--port must be between 1 and 65535")
    cli.check_bindable(a.host, a.port, "--port")
    env = server_env(home, token)
    argv = serve_argv(a.port, a.host, home)
    shown = "localhost" if a.host in ("0.0.0.0", "::") else a.host
    sys.stderr.write(f"munet: serving {home} on http://{shown}:{a.port} "
                     f"(OpenAPI: /openapi.json, metrics: /metrics, ready: /readyz); "
                     f"task submission {'needs the API token' if token else 'is open (no MUNET_API_TOKEN)'}\n")
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def _post_json(url: str, payload: dict, timeout: float) -> tuple[int, dict]:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": str(e.code), "detail": body.decode("utf-8", "replace")[:300]}


def cmd_predict(ctx: "cli.Context") -> int:
    a = ctx.args
    if a.top < 1:
        raise cli.CliError("--top must be 1 or more")
    if a.timeout <= 0:
        raise cli.CliError("--timeout must be more than 0 seconds")
    blobs = []
    for name in a.images:
        path = Path(name)
        if not path.is_file():
            raise cli.CliError(f"no such image file: {name}")
        blobs.append(base64.b64encode(path.read_bytes()).decode())
    url = a.url.rstrip("/") + "/predict"
    try:
        code, body = _post_json(url, {"task": a.task, "images": blobs, "top": a.top}, a.timeout)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError):
            raise cli.CliError(f"the server at {a.url} did not answer within {a.timeout:g}s (--timeout)") from None
        raise cli.CliError(f"no munet server at {a.url} ({reason}); start one with `munet serve`") from None
    except ValueError:  # an answer that is not JSON: something else listens there
        raise cli.CliError(f"{a.url} answered, but not as a munet server (no JSON)") from None
    if code != 200:
        raise cli.CliError(f"{body.get('error', code)}: {body.get('detail', '')}")
    if ctx.json:
        ctx.print_json(body)
        return 0
    from rich.table import Table

    table = Table(title=f"task {body['task']} (path {body['path_id']})", title_justify="left")
    for col, justify in (("image", "left"), ("class", "left"), ("label", "right"), ("score", "right"), ("top", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for name, p in zip(a.images, body["predictions"]):
        others = ", ".join(f"{t['class']} {t['score']:.3f}" for t in p["top"][1:])
        table.add_row(name, str(p["class"]), str(p["label"]), f"{p['score']:.4f}", others)
    ctx.console.print(table)
    return 0


# -- quickstart --serve -----------------------------------------------------------------------------

def qs_serve(ctx: "cli.Context") -> None:
    """`munet quickstart --serve`: one evolver worker in the background, the server in the
    foreground, a ready-to-paste curl and the API token (generated once, kept in the home)."""
    if not getattr(ctx.args, "serve", False):
        return
    cli.qs_show(ctx)  # the summary first: serving blocks until Ctrl-C
    system = ctx.system()
    home = system.settings.home
    token = system.settings.api_token or stored_token(home)
    if not token:
        token = secrets.token_urlsafe(24)
        path = Path(home) / TOKEN_FILE
        path.write_text(token + "\n")
        os.chmod(path, 0o600)
    port = ctx.args.port
    env = server_env(home, token)
    ctx.close()
    evolver = subprocess.Popen([sys.executable, "-m", "munet.cli", "evolve", "--forever", "--workers", "1"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = subprocess.Popen(serve_argv(port, "0.0.0.0", home), env=env, start_new_session=True)
    ctx.console.print(f"[bold]5.[/] evolver worker running in the background (pid {evolver.pid}); "
                      f"server starting on http://localhost:{port}")
    ctx.console.print(f"API token (for POST/DELETE /tasks): {token}")
    ctx.console.print("try, once it answers /readyz:\n"
                      f"  python -c \"import base64,io,numpy as n;from PIL import Image as I;b=io.BytesIO();"
                      f"I.fromarray((n.eye(8)*255).astype('uint8')).save(b,'PNG');print(base64.b64encode(b.getvalue()).decode())\" > /tmp/img.b64\n"
                      f"  curl -s -X POST http://localhost:{port}/predict -H 'Content-Type: application/json' "
                      f"-d \"{{\\\"task\\\": \\\"{cli.QUICKSTART_TASK}\\\", \\\"image\\\": \\\"$(cat /tmp/img.b64)\\\"}}\"\n"
                      "Ctrl-C stops both.")
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (server, evolver):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 20
        for proc in (server, evolver):
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    raise SystemExit(server.returncode if server.returncode and server.returncode > 0 else 0)


def register(subparsers) -> None:
    p = cli.add_command(subparsers, "serve", cmd_serve,
                        "serve inference, task submission, lineage and metrics over HTTP (BentoML)")
    p.add_argument("--port", type=int, default=3000, help="port to listen on (default 3000)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    p = cli.add_command(subparsers, "predict", cmd_predict, "classify image files with a running server", json_flag=True)
    p.add_argument("task", help="task name")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="server URL (default http://127.0.0.1:3000)")
    p.add_argument("--top", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer (default 60)")
    quickstart = subparsers.choices.get("quickstart")
    if quickstart is not None:
        quickstart.add_argument("--serve", action="store_true",
                                help="then start one evolver worker in the background and the server in the foreground")
        quickstart.add_argument("--port", type=int, default=3000, help="server port with --serve (default 3000)")
        cli.add_quickstart_step("serve", qs_serve)
    examples = [
        ("munet serve --port 3000", "the HTTP server: POST /predict, /tasks, GET /metrics, /openapi.json"),
        ("munet predict digits img1.png img2.png [--url http://127.0.0.1:3000]", "classify images with a running server"),
        ("munet quickstart --serve", "the quickstart, then an evolver in the background and the server in the foreground"),
    ]
    cli.EXAMPLES.extend(e for e in examples if e not in cli.EXAMPLES)
