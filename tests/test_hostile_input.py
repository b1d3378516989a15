"""Hostile input against the real server process: schema-driven fuzzing of every route of
the published OpenAPI document, hostile images, hostile data-set uploads (over HTTP and
`munet task add`) and task names. The answer is always a JSON 4xx naming the problem (or a
correct prediction for a legitimate image), never a 5xx, and nothing is written outside the
data-set store."""
from __future__ import annotations

import base64
import io
import os
import stat
import struct
import tarfile
import threading
import time
import urllib.parse
import uuid
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from munet.server import api
from munet.storage.schema import TASK_NAME, validate_task_name
from munet.system import System

from conftest import make_settings
from server_support import Server, make_installation, multipart, squares

TOKEN = "hostile-token-51aa"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA_REQUESTS = 1000  # at least this many generated requests in all


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SQLite, a token, a private TMPDIR (extraction folders must not outlive a request)."""
    home = tmp_path_factory.mktemp("hostile")
    system = System(make_settings(home))
    make_installation(system, {"alpha": 3, "beta": 4})
    tmp = home / "tmp"
    tmp.mkdir()
    srv = Server(home, env={"MUNET_API_TOKEN": TOKEN, "TMPDIR": str(tmp)})
    try:
        srv.start(timeout=600)
        yield srv, system
    finally:
        srv.stop()
        system.engine.dispose()


def assert_json_error(code, body, status, error=None, fragment=None, what=None):
    assert code == status, (what, code, body)
    assert isinstance(body, dict) and set(body) == {"error", "detail"}, (what, body)
    assert isinstance(body["error"], str) and isinstance(body["detail"], str) and body["detail"], (what, body)
    if error:
        assert body["error"] == error, (what, body)
    if fragment:
        assert fragment in body["detail"], (what, body)


# -- schema-driven fuzzing ------------------------------------------------------------------------

def test_schema_fuzzing_gives_no_5xx_and_only_json_errors(server):
    """Schemathesis generates requests from the server's own /openapi.json, valid by the
    schema and not (negative mode: wrong types, missing and extra fields, broken bounds)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    srv, _ = server
    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /predict", "POST /predict/upload", "POST /tasks", "DELETE /tasks/{name}",
            "PUT /tasks/{name}/pin", "GET /tasks/{name}/lineage"} <= labels, labels
    assert loose_request_schemas(srv.get("/openapi.json")[1]) == []

    sent: dict[str, int] = {}
    failures: list = []

    def exercise(op, mode, examples: int, round_: int) -> None:
        @seed(round_)
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            # The token every other request: the guarded routes are fuzzed past the 401 too.
            headers = AUTH if sum(sent.values()) % 2 else None
            response = case.call(base_url=srv.url, headers=headers, timeout=120)
            sent[op.label] = sent.get(op.label, 0) + 1
            problem = None
            if response.status_code >= 500:
                problem = "5xx"
            elif response.status_code >= 400:
                try:
                    body = response.json()
                except ValueError:
                    body = None
                if not (isinstance(body, dict) and set(body) == {"error", "detail"}
                        and isinstance(body["detail"], str)):
                    problem = "not the JSON error shape"
            if problem:
                failures.append((problem, op.label, response.status_code, response.text[:300],
                                 case.as_curl_command()[:500]))

        try:
            run()
        except Unsatisfiable:
            pass  # no invalid input exists (an operation without parameters, in negative mode)

    # Operations with inputs get the requests; the others (GET /tasks, /status) a few each.
    has_input = {op.label: bool(op.body or op.path_parameters or op.query) for op in operations}
    for round_ in range(4):
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                exercise(op, mode, 32 if has_input[op.label] else 2, round_)
        if sum(sent.values()) >= SCHEMA_REQUESTS:
            break
    total = sum(sent.values())
    assert not failures, failures[:5]
    assert total >= SCHEMA_REQUESTS, sent
    for label in ("POST /predict", "POST /predict/upload", "POST /tasks", "PUT /tasks/{name}/pin"):
        assert sent.get(label, 0) >= 32, sent
    # The server is still healthy afterwards.
    assert srv.get("/readyz")[0] == 200


def loose_request_schemas(doc: dict) -> list[str]:
    """Every request input of an OpenAPI document that is not bounded: objects that allow
    extra properties, strings without maxLength, arrays without maxItems. Uploaded file
    contents (binary strings) are bounded by the body limit instead (413)."""
    schemas = doc["components"]["schemas"]
    found = []

    def walk(s: dict, where: str) -> None:
        while "$ref" in s:
            s = schemas[s["$ref"].rsplit("/", 1)[-1]]
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in s.get(key, []):
                walk(sub, where)
        kind = s.get("type")
        if kind == "string" and "maxLength" not in s and "enum" not in s and "contentMediaType" not in s \
                and s.get("format") != "binary":
            found.append(f"{where}: a string without maxLength")
        if kind == "array":
            if "maxItems" not in s:
                found.append(f"{where}: an array without maxItems")
            walk(s.get("items", {}), where + "[]")
        if kind == "object" or "properties" in s:
            if s.get("additionalProperties", True) is not False:
                found.append(f"{where}: an object that allows extra properties")
            for name, sub in s.get("properties", {}).items():
                walk(sub, f"{where}.{name}")

    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for param in op.get("parameters", []):
                walk(param["schema"], f"{method.upper()} {path} {param['name']}")
            for media in op.get("requestBody", {}).get("content", {}).values():
                walk(media["schema"], f"{method.upper()} {path} body")
    return found


def test_the_strictness_check_finds_loose_schemas():
    doc = {"components": {"schemas": {"M": {"type": "object", "properties": {"a": {"type": "string"},
                                                                           "b": {"type": "array", "items": {}}}}}},
           "paths": {"/x": {"post": {"requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/M"}}}},
                                     "parameters": [{"name": "q", "schema": {"type": "string", "maxLength": 3}}]}}}}
    assert loose_request_schemas(doc) == ["POST /x body: an object that allows extra properties",
                                          "POST /x body.a: a string without maxLength",
                                          "POST /x body.b: an array without maxItems"]
    assert loose_request_schemas(api.create_app().openapi()) == []


# -- images -----------------------------------------------------------------------------------------

def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds almost nothing (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gif_header(width: int, height: int) -> bytes:
    still = encode(Image.new("L", (4, 4), 7), "GIF")
    return still[:6] + struct.pack("<HH", width, height) + still[10:]


def jpeg_header(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "JPEG"))
    at = data.find(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def sample_image(seed: int = 0) -> np.ndarray:
    return squares(1, 3, seed=seed)[0][0]  # uint8 [32, 32, 3], a square of the task's classes


def predict(srv, payload, **kw):
    code, body, _ = srv.post_json("/predict", payload, timeout=120, **kw)
    return code, body


def scores(body) -> list[float]:
    return [t["score"] for t in sorted(body["predictions"][0]["top"], key=lambda t: t["label"])]


def test_hostile_images_get_a_clear_4xx(server):
    srv, _ = server
    png = encode(Image.fromarray(sample_image()))
    cases = [
        ("zero bytes", {"task": "alpha", "image": ""}, 400, "invalid_request", None),
        ("zero-byte image", {"task": "alpha", "image": "data:image/png;base64,"}, 400, "invalid_image", "empty"),
        ("truncated PNG", {"task": "alpha", "image": b64(png[: len(png) // 2])}, 400, "invalid_image", "could not be decoded"),
        ("PNG signature only", {"task": "alpha", "image": b64(png[:8])}, 400, "invalid_image", None),
        ("not an image", {"task": "alpha", "image": b64(b"%PDF-1.4 hello")}, 400, "invalid_image", "supported format"),
        ("EPS is not opened", {"task": "alpha", "image": b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n")},
         400, "invalid_image", "supported format"),
        ("wrong base64", {"task": "alpha", "image": "!!not base64!!"}, 400, "invalid_image", "base64"),
        ("base64 of one byte", {"task": "alpha", "image": "A"}, 400, "invalid_image", None),
        ("data URL of garbage", {"task": "alpha", "image": "data:image/png;base64,@@@"}, 400, "invalid_image", "base64"),
        ("20000x20000 PNG header", {"task": "alpha", "image": b64(png_header(20000, 20000))}, 413, "invalid_image", "pixels"),
        ("7000x7000 PNG header", {"task": "alpha", "image": b64(png_header(7000, 7000))}, 413, "invalid_image", "40,000,000"),
        ("20000x20000 GIF header", {"task": "alpha", "image": b64(gif_header(20000, 20000))}, 413, "invalid_image", "pixels"),
        ("20000x20000 JPEG header", {"task": "alpha", "image": b64(jpeg_header(20000, 20000))}, 413, "invalid_image", "pixels"),
        ("image is a number", {"task": "alpha", "image": 5}, 400, "invalid_request", "image"),
        ("images is a string", {"task": "alpha", "images": "abc"}, 400, "invalid_request", "images"),
        ("images holds null", {"task": "alpha", "images": [None]}, 400, "invalid_request", None),
        ("top is a string", {"task": "alpha", "image": b64(png), "top": "3"}, 400, "invalid_request", "top"),
        ("top is huge", {"task": "alpha", "image": b64(png), "top": 10**12}, 400, "invalid_request", "top"),
        ("task is a list", {"task": ["alpha"], "image": b64(png)}, 400, "invalid_request", "task"),
        ("both image and images", {"task": "alpha", "image": b64(png), "images": [b64(png)]}, 400, "invalid_request", None),
        ("an unknown field", {"task": "alpha", "image": b64(png), "shape": [1]}, 400, "invalid_request", "shape"),
        ("1025 images", {"task": "alpha", "images": ["AAAA"] * 1025}, 400, "invalid_request", "images"),
        ("65 images", {"task": "alpha", "images": [b64(png)] * 65}, 413, "too_many_images", "64"),
        ("too many pixels together", {"task": "alpha", "images": [b64(png_header(5000, 5000))] * 3}, 413,
         "too_many_pixels", None),
    ]
    for what, payload, status, error, fragment in cases:
        code, body = predict(srv, payload)
        assert_json_error(code, body, status, error, fragment, what)
    for what, raw in (("JSON array", b"[1, 2]"), ("JSON null", b"null"), ("not JSON", b"{'task': 'alpha'"),
                      ("not UTF-8", b'{"task": "\xff\xfe"}'), ("deep nesting", b"[" * 100_000 + b"]" * 100_000)):
        code, body, _ = srv.post_json("/predict", raw)
        assert_json_error(code, body, 400, None, None, what)
    files, ctype = multipart({"task": "alpha"}, [("files", "empty.png", b"")])
    code, body, _ = srv.request("POST", "/predict/upload", files, {"Content-Type": ctype})
    assert_json_error(code, body, 400, "invalid_image", "empty", "zero-byte upload")


def test_legitimate_images_of_any_mode_are_classified_like_their_8_bit_rgb_twin(server):
    """1x1, alpha, 16-bit, palette, CMYK, greyscale and animations (first frame) all answer
    200; where the conversion is exact the scores equal those of the plain RGB image."""
    srv, _ = server
    rgb = sample_image(1)
    grey = rgb.mean(axis=2).astype(np.uint8)
    code, ref = predict(srv, {"task": "alpha", "image": b64(encode(Image.fromarray(rgb))), "top": 3})
    assert code == 200, ref
    code, ref_grey = predict(srv, {"task": "alpha", "image": b64(encode(Image.fromarray(grey))), "top": 3})
    assert code == 200, ref_grey

    opaque = np.dstack([rgb, np.full(grey.shape, 255, np.uint8)])
    later = Image.fromarray(255 - rgb)
    gif = io.BytesIO()
    Image.fromarray(rgb).quantize(256, dither=Image.Dither.NONE).save(gif, "GIF", save_all=True,
                                                                     append_images=[later.quantize(256)])
    apng = encode(Image.fromarray(rgb), "PNG", save_all=True, append_images=[later])
    exact = {  # same pixels after conversion: same scores
        "RGBA, opaque": (encode(Image.fromarray(opaque, "RGBA")), ref),
        "APNG, first frame": (apng, ref),
        "16-bit grey": (encode(Image.fromarray(grey.astype(np.uint16) * 257)), ref_grey),
        "LA, opaque": (encode(Image.fromarray(np.dstack([grey, np.full(grey.shape, 255, np.uint8)]), "LA")), ref_grey),
        "TIFF": (encode(Image.fromarray(rgb), "TIFF"), ref),
        "BMP": (encode(Image.fromarray(rgb), "BMP"), ref),
    }
    for what, (data, twin) in exact.items():
        code, body = predict(srv, {"task": "alpha", "image": b64(data), "top": 3})
        assert code == 200, (what, body)
        assert scores(body) == pytest.approx(scores(twin), abs=1e-5), what
    code, body = predict(srv, {"task": "alpha", "image": b64(gif.getvalue()), "top": 3})
    assert code == 200, body
    code2, first = predict(srv, {"task": "alpha", "image": b64(encode(Image.open(io.BytesIO(gif.getvalue())).convert("RGB"))), "top": 3})
    assert scores(body) == pytest.approx(scores(first), abs=1e-5), "GIF: the first frame is used"
    others = {
        "1x1": encode(Image.new("RGB", (1, 1), (200, 10, 10))),
        "1x1 greyscale": encode(Image.new("L", (1, 1), 5)),
        "CMYK JPEG": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "RGBA, transparent": encode(Image.new("RGBA", (9, 3), (255, 255, 255, 0))),
        "palette with transparency": encode(Image.new("P", (5, 5), 3), "PNG", transparency=3),
        "1-bit": encode(Image.new("1", (17, 5), 1)),
        "32-bit float TIFF": encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
        "WebP": encode(Image.fromarray(rgb), "WEBP"),
    }
    for what, data in others.items():
        code, body = predict(srv, {"task": "alpha", "image": b64(data), "top": 3})
        assert code == 200 and len(body["predictions"]) == 1, (what, body)
        assert sum(t["score"] for t in body["predictions"][0]["top"]) == pytest.approx(1.0, abs=1e-4), what


def _server_rss(srv) -> int:
    root = psutil.Process(srv.proc.pid)
    return sum(p.memory_info().rss for p in [root] + root.children(recursive=True))


def test_hostile_images_keep_memory_bounded(server):
    """Headers claiming 49M to 400M pixels, sent 8 requests at a time: refused on the header,
    so the server's memory stays flat (decoding one 7000x7000 image would take 147 MB, one
    20000x20000 image 1.2 GB)."""
    srv, _ = server
    bombs = [png_header(20000, 20000), gif_header(20000, 20000), jpeg_header(20000, 20000), png_header(7000, 7000)]
    payloads = [{"task": "alpha", "images": [b64(bombs[i % 4])] * 8} for i in range(32)]
    predict(srv, payloads[0])  # warm
    before = _server_rss(srv)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(_server_rss(srv))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    answers, started = [], time.monotonic()
    try:
        with ThreadPoolExecutor(8) as pool:
            # An idle server refuses all 32 in ~50 ms: keep the load on for a second so the
            # sampler sees it (a fixed request count made the check depend on machine speed).
            while not answers or time.monotonic() - started < 1.0:
                answers += pool.map(lambda p: predict(srv, p), payloads)
    finally:
        done.set()
        sampler.join()
    for code, body in answers:
        assert_json_error(code, body, 413, "invalid_image", "pixels")
    grown = max(peak) - before
    assert len(peak) > 5, f"the sampler ran {len(peak)} times during {len(answers)} requests"
    assert grown < 100 * 1024**2, f"the server grew by {grown / 1024**2:.0f} MiB"


# -- data-set uploads ------------------------------------------------------------------------------

ESCAPE = f"escaped-{uuid.uuid4().hex[:12]}"


def _images_zip(classes=("cat", "dog"), per_class=4, extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k, name in enumerate(classes):
            for i in range(per_class):
                zf.writestr(f"top/{name}/{i}.png", encode(Image.new("RGB", (8, 8), (40 * k, 200, i))))
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _images_tar(special: tarfile.TarInfo | None = None, extra: list[tuple[str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for k, name in enumerate(("cat", "dog")):
            for i in range(4):
                data = encode(Image.new("RGB", (8, 8), (40 * k, 200, i)))
                info = tarfile.TarInfo(f"top/{name}/{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if special is not None:
            tar.addfile(special)
    return buf.getvalue()


def _special(kind: bytes, name: str = "top/cat/special.png", link: str = "/etc/passwd") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.devmajor, info.devminor = 1, 3
    return info


def zip_bomb(size: int = 5 * 1024**3 // 2) -> bytes:
    """A real zip bomb: one entry of `size` zero bytes in about 2.5 MB. Deflate segments
    ended by a full flush do not depend on what came before, so one compressed 16 MiB
    segment is repeated instead of compressing gigabytes."""
    chunk = bytes(1 << 24)
    co = zlib.compressobj(1, zlib.DEFLATED, -15)
    first, second = (co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH) for _ in range(2))
    n = size >> 24
    data = first + second * (n - 1) + co.flush()
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(chunk, crc)
    name = b"top/cat/bomb.png"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(data), n << 24, len(name), 0) + name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0x21, crc, len(data), n << 24, len(name),
                          0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(local) + len(data), 0)
    return local + data + central + end


def _npz(**override) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), "y_train": np.arange(12) % 3,
              "x_test": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(6) % 3,
              "classes": np.array(["a", "b", "c"])}
    arrays.update(override)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Booby:
    """Unpickling this creates a file, so its absence proves nothing was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, list[tuple[str, str, bytes, str]]]:
    """A trap file (created only if something unpickles) and the uploads: (case, file name,
    bytes, a fragment of the refusal). Built once: the zip bomb takes a few seconds."""
    trap = tmp_path_factory.mktemp("trap") / "unpickled"
    return trap, hostile_uploads(trap)


def hostile_uploads(trap: Path) -> list[tuple[str, str, bytes, str]]:
    empty_dirs = io.BytesIO()
    with zipfile.ZipFile(empty_dirs, "w") as zf:
        zf.writestr("top/cat/", b"")
        zf.writestr("top/dog/", b"")
    return [
        ("zip slip", "d.zip", _images_zip(extra=[(f"top/cat/../../../../{ESCAPE}.png", b"x")]), "climbs out"),
        ("absolute zip name", "d.zip", _images_zip(extra=[(f"/tmp/{ESCAPE}.png", b"x")]), "absolute path"),
        ("zip symlink", "d.zip", _images_zip(extra=[(_symlink_entry("top/cat/link.png"), b"/etc/passwd")]), "symbolic link"),
        ("zip bomb", "d.zip", zip_bomb(), "expands to more than"),
        ("tar slip", "d.tar.gz", _images_tar(extra=[(f"top/../../{ESCAPE}.png", b"x")]), "climbs out"),
        ("tar symlink", "d.tar.gz", _images_tar(_special(tarfile.SYMTYPE)), "symbolic link"),
        ("tar hard link", "d.tar.gz", _images_tar(_special(tarfile.LNKTYPE, link="top/cat/0.png")), "hard link"),
        ("tar character device", "d.tar.gz", _images_tar(_special(tarfile.CHRTYPE)), "character device"),
        ("tar block device", "d.tar.gz", _images_tar(_special(tarfile.BLKTYPE)), "block device"),
        ("tar FIFO", "d.tar.gz", _images_tar(_special(tarfile.FIFOTYPE)), "FIFO"),
        ("non-image file", "d.zip", _images_zip(extra=[("top/cat/notes.txt", b"meow\n")]), "cat/notes.txt"),
        ("single class", "d.zip", _images_zip(classes=("cat",)), "at least 2 classes"),
        ("zero images", "d.zip", empty_dirs.getvalue(), "holds no images"),
        ("mismatched label count", "d.npz", _npz(y_train=np.arange(11) % 3), "x_train has 12 images but y_train has 11"),
        ("label out of range", "d.npz", _npz(y_test=np.array([0, 1, 2, 0, 1, 9])), "holds label 9"),
        ("pickled objects", "d.npz", _npz(classes=np.array([Booby(trap), "b", "c"], dtype=object)), "Python objects"),
        ("not an archive", "d.bin", b"hello, world " * 50, "not a zip, tar or npz"),
    ]


def _tree_state(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under `home` but the server's log, BentoML's own folders (its home, its
    client folders in TMPDIR) and the database (a refusal may still read it)."""
    out = {}
    for path in home.rglob("*"):
        rel = path.relative_to(home).as_posix()
        if rel.startswith(("bentoml", "server-", "munet.db", "tmp/bentoml-")):
            continue
        st = path.lstat()
        out[rel] = (0 if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_mode)  # a folder's size is its listing's
    return out


def _no_escapes(deep: list[Path], shallow: list[Path]) -> None:
    """No file named like the escaping entries anywhere under `deep`, or directly in `shallow`."""
    for root in deep:
        assert not list(root.rglob(f"{ESCAPE}*")), root
    for root in shallow:
        assert not list(root.glob(f"{ESCAPE}*")), root


def test_hostile_uploads_over_http_are_refused_and_write_nothing(server, hostile, tmp_path):
    srv, system = server
    home = Path(system.settings.home)
    trap, uploads = hostile
    before = _tree_state(home)
    names = {t["name"] for t in srv.get("/tasks")[1]}
    assert any(k.startswith("datasets/") for k in before)
    for i, (case, filename, data, fragment) in enumerate(uploads):
        body, ctype = multipart({"name": f"hostile{i}"}, [("file", filename, data)])
        code, answer, _ = srv.request("POST", "/tasks", body, {"Content-Type": ctype, **AUTH}, timeout=300)
        assert_json_error(code, answer, 400, "invalid_dataset", fragment, case)
        assert _tree_state(home) == before, case  # the store and everything around it unchanged
        assert not list((home / "tmp").glob("munet-data-*")), case  # extraction folders are gone
    _no_escapes([home, tmp_path], [home.parent, home.parent.parent, Path("/tmp"), Path("/")])
    assert not trap.exists()
    assert {t["name"] for t in srv.get("/tasks")[1]} == names
    body, ctype = multipart({"name": "hollow"}, [("file", "d.zip", b"")])
    code, answer, _ = srv.request("POST", "/tasks", body, {"Content-Type": ctype, **AUTH})
    assert_json_error(code, answer, 400, "empty_file")


@pytest.mark.parametrize("case", ["zip slip", "zip symlink", "zip bomb", "tar slip", "tar character device",
                                  "non-image file", "pickled objects"])
def test_hostile_uploads_through_munet_task_add_are_refused(case, hostile, cli_system, tmp_path, monkeypatch, capsys):
    import tempfile

    from munet import cli

    home = Path(cli_system.settings.home)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    trap, uploads = hostile
    _, filename, data, fragment = next(c for c in uploads if c[0] == case)
    upload = tmp_path / "upload" / filename
    upload.parent.mkdir()
    upload.write_bytes(data)
    before = _tree_state(home)
    for key in [k for k in os.environ if k.startswith("MUNET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MUNET_HOME", str(home))
    rc = cli.main(["task", "add", "hostile", "--data", str(upload)])
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("munet: error: ") and fragment in lines[0], err
    assert _tree_state(home) == before
    assert list(private_tmp.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == [filename]
    _no_escapes([home, tmp_path], [home.parent, Path("/tmp")])
    assert not trap.exists()
    assert cli_system.tasks_json() == []


@pytest.fixture(scope="module")
def cli_system(tmp_path_factory):
    """An installation with a root and no task (refused uploads leave it so)."""
    system = System(make_settings(tmp_path_factory.mktemp("cli_hostile")))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    yield system
    system.engine.dispose()


# -- task names ------------------------------------------------------------------------------------

BAD_NAMES = ["", "a/b", "../etc", "..", "a\\b", "/abs", "x" * 64, "Alpha", "ålpha", "tâche", "名前", "alpha\u200b",
             "a'; DROP TABLE tasks;--", 'a"b', "a%2Fb", "a b", "a\nb", "alpha\n", "a\x00", "-lead", "_lead", "a.b", "a;b"]
GOOD_NAMES = ["a", "0", "x" * 63, "my-task_2", "9lives"]


def test_one_rule_for_task_names():
    for name in BAD_NAMES:
        with pytest.raises(ValueError, match="use 1-63 characters from a-z, 0-9, '_' and '-'"):
            validate_task_name(name)
    for name in GOOD_NAMES:
        assert validate_task_name(name) == name
    # The HTTP schemas and the path check use the same pattern.
    assert api.TASK_PATTERN == TASK_NAME.pattern
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert TASK_NAME.pattern.strip("^$") in readme


def test_bad_task_names_are_refused_by_http_cli_and_storage(server, tmp_path, monkeypatch, capsys):
    from munet import cli

    srv, system = server
    doc = srv.get("/openapi.json")[1]
    assert doc["components"]["schemas"]["PredictRequest"]["properties"]["task"]["pattern"] == TASK_NAME.pattern
    data = _npz()
    upload = tmp_path / "d.npz"
    upload.write_bytes(data)
    for key in [k for k in os.environ if k.startswith("MUNET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MUNET_HOME", system.settings.home)
    before = _tree_state(Path(system.settings.home))
    for name in BAD_NAMES:
        body, ctype = multipart({"name": name}, [("file", "d.npz", data)])
        code, answer, _ = srv.request("POST", "/tasks", body, {"Content-Type": ctype, **AUTH})
        assert code == 400 and answer["error"] in ("invalid_name", "invalid_request"), (name, answer)
        if answer["error"] == "invalid_name":
            assert "use 1-63 characters" in answer["detail"], (name, answer)
        code, answer = predict(srv, {"task": name, "image": "AAAA"})
        assert_json_error(code, answer, 400, "invalid_request", "task", name)
        with pytest.raises(ValueError, match="invalid task name"):
            system.add_task(name, data, filename="d.npz")
        rc = cli.main(["task", "add", "--data", str(upload), "--", name])  # '--': a name may start with '-'
        _, err = capsys.readouterr()
        assert rc != 0 and "use 1-63 characters" in err, (name, err)
    for name in ("../etc", "a b", "名前", "a'; DROP TABLE tasks;--", "x" * 200):
        quoted = urllib.parse.quote(name, safe="")
        code, answer = srv.get(f"/tasks/{quoted}")
        assert_json_error(code, answer, 404, None, None, name)
        code, answer, _ = srv.request("DELETE", f"/tasks/{quoted}", headers=AUTH)
        assert code in (404, 400) and set(answer) == {"error", "detail"}, (name, answer)
    assert _tree_state(Path(system.settings.home)) == before
    assert {t["name"] for t in srv.get("/tasks")[1]} == {"alpha", "beta"}
