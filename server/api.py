"""The REST API (a FastAPI app that the BentoML service mounts) and the gateway logic.

/predict validates the request (strict pydantic schemas), resolves the task's path once per
request from the executor's route table, decodes the images (`server.images`), and hands
one item per image to the executor's batchable API; the executor batches items of many
requests and tasks together. Routes, auth (bearer token, constant-time compare), the body
limit (413) and the error shape `{"error": CODE, "detail": TEXT}` all live here. A 5xx is
never the answer to an input: 503 with Retry-After means overload (queue bound, deadline)
or an outage (executor or database unreachable). A restarting executor is not an outage
for a request that can wait: calls that fail at the connection level, or that the executor
answers with "still loading", are sent again with backoff until the request's deadline
(`Gateway.ride_out`); overload and per-item errors are never retried.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Form, Path, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from munet.storage.schema import TASK_NAME

from . import images, metrics
from .protocol import Item, Result

log = logging.getLogger("munet.server.api")

TASK_PATTERN = TASK_NAME.pattern
PROTECTED_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Limits:
    """Request bounds; each has an environment variable."""

    max_images: int = 64                      # MUNET_MAX_IMAGES: images per request
    max_body_bytes: int = 32 * 1024**2        # MUNET_MAX_BODY_BYTES: /predict and other bodies
    max_upload_bytes: int = 512 * 1024**2     # MUNET_MAX_UPLOAD_BYTES: POST /tasks data sets
    max_image_pixels: int = images.MAX_PIXELS  # MUNET_MAX_IMAGE_PIXELS: one image, checked on its header
    max_request_pixels: int = 64_000_000      # MUNET_MAX_REQUEST_PIXELS: all images of one request
    max_inflight: int = 64                    # MUNET_MAX_INFLIGHT: concurrent /predict requests (queue bound)
    max_inflight_pixels: int = 256_000_000    # MUNET_MAX_INFLIGHT_PIXELS: decoded pixels held by the gateway
    deadline_s: float = 30.0                  # MUNET_REQUEST_TIMEOUT_S: per request, then 503
    max_top: int = 1000
    route_refresh_s: float = 0.5              # how often the gateway re-reads the route table
    executor_try_s: float = 10.0              # MUNET_EXECUTOR_TRY_S: one executor call, then sent again

    @classmethod
    def from_env(cls) -> "Limits":
        d = cls()
        return cls(
            max_images=_env_int("MUNET_MAX_IMAGES", d.max_images),
            max_body_bytes=_env_int("MUNET_MAX_BODY_BYTES", d.max_body_bytes),
            max_upload_bytes=_env_int("MUNET_MAX_UPLOAD_BYTES", d.max_upload_bytes),
            max_image_pixels=_env_int("MUNET_MAX_IMAGE_PIXELS", d.max_image_pixels),
            max_request_pixels=_env_int("MUNET_MAX_REQUEST_PIXELS", d.max_request_pixels),
            max_inflight=_env_int("MUNET_MAX_INFLIGHT", d.max_inflight),
            max_inflight_pixels=_env_int("MUNET_MAX_INFLIGHT_PIXELS", d.max_inflight_pixels),
            deadline_s=_env_float("MUNET_REQUEST_TIMEOUT_S", d.deadline_s),
            route_refresh_s=_env_float("MUNET_ROUTE_REFRESH_S", d.route_refresh_s),
            executor_try_s=_env_float("MUNET_EXECUTOR_TRY_S", d.executor_try_s),
        )


# -- errors ---------------------------------------------------------------------------------------

class ApiError(StarletteHTTPException):
    """An error answered as {"error": code, "detail": text}."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.error = error


def unavailable(error: str, detail: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, error, detail, headers={"Retry-After": str(retry_after)})


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 429: "too_many_requests", 503: "unavailable"}


def error_body(error: str, detail: Any) -> dict:
    return {"error": error, "detail": detail if isinstance(detail, str) else json.dumps(detail, default=str)}


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# -- schemas ---------------------------------------------------------------------------------------

B64 = Annotated[str, Field(min_length=1, max_length=48 * 1024**2, description="base64 (or a data: URL) of an image file")]
TaskName = Annotated[str, Field(min_length=1, max_length=63, pattern=TASK_PATTERN,
                                description="a task name: a-z, 0-9, '_' and '-', starting with a letter or digit")]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"task": "digits", "image": "iVBORw0KGgo..."}]})

    task: TaskName
    image: B64 | None = None
    images: Annotated[list[B64], Field(min_length=1, max_length=1024)] | None = None
    top: Annotated[int, Field(ge=1, le=1000, description="how many classes to list per image")] = 5

    @model_validator(mode="after")
    def _one_of(self):
        if (self.image is None) == (self.images is None):
            raise ValueError("give exactly one of 'image' (one base64 string) or 'images' (a list of them)")
        return self


class TopClass(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class")
    label: int
    score: float


class Prediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    label: int = Field(description="the class index")
    class_: str = Field(alias="class", description="the class name")
    score: float = Field(description="its probability")
    top: list[TopClass]


class PredictResponse(BaseModel):
    task: str
    path_id: str = Field(description="the path that answered")
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    detail: str


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    path_id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]{1,64}$")]


class UploadForm(BaseModel):
    """POST /predict/upload, multipart. A form model so unknown fields are refused too."""

    model_config = ConfigDict(extra="forbid")

    task: TaskName
    files: Annotated[list[UploadFile], Field(min_length=1, max_length=1024, description="one or more image files")]
    top: Annotated[int, Field(ge=1, le=1000, description="how many classes to list per image")] = 5


class TaskForm(BaseModel):
    """POST /tasks, multipart; the name is checked by `validate_task_name` (a clear 400)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=63, description="the new task's name")]
    file: Annotated[UploadFile, Field(description=".npz, .zip, .tar(.gz) data set")]
    root: Annotated[str | None, Field(min_length=1, max_length=63, description="the root (default: the first)")] = None


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 503)}


# -- the gateway -----------------------------------------------------------------------------------

class Backend(Protocol):
    """The executor as the gateway sees it (a BentoML dependency, or in-process)."""

    async def infer(self, items: list[Item]) -> list[Result]: ...
    async def routes(self, since: int) -> dict: ...
    async def status(self) -> dict: ...
    async def refresh(self) -> dict: ...


class Overloaded(Exception):
    """The executor's queue is full: 503 `overloaded` at once (never retried)."""


class Outage(Exception):
    """The executor failed: 503 `executor_unavailable` at once."""


class ExecutorDown(Outage):
    """A connection-level failure: the executor is unreachable, restarting, or still loading
    its live paths (`error` "not_ready"). Inference is idempotent, so the gateway sends the
    call again until the request's deadline (`Gateway.ride_out`)."""

    def __init__(self, detail: str, error: str = "executor_unavailable"):
        super().__init__(detail)
        self.error = error


RETRY_FIRST_S, RETRY_MAX_S = 0.1, 1.0  # backoff while the executor is down: 0.1 s doubling to 1 s


@dataclass
class Gateway:
    backend: Backend
    system: Any  # munet.system.System (task API); None disables the task routes
    limits: Limits = field(default_factory=Limits.from_env)
    api_token: str | None = None
    # MUNET_PROTECT_PREDICT=1: inference needs the token too (without a token it is refused).
    protect_predict: bool = field(default_factory=lambda: os.environ.get("MUNET_PROTECT_PREDICT", "") == "1")

    def __post_init__(self):
        self.version = -1
        self.ready = False
        self.health: dict = {}  # the executor's `SwapListener.health()`, from the route table
        self.tasks: dict[str, dict] = {}
        self.fetched_at = 0.0
        self.inflight = 0
        self.inflight_pixels = 0
        self._pixel_lock = threading.Lock()
        self._refreshing: asyncio.Future | None = None
        self._refresher: asyncio.Task | None = None

    # -- route table ------------------------------------------------------------------------
    async def refresh_routes(self, min_age: float = 0.0) -> None:
        """Re-read the executor's route table (concurrent callers share one call)."""
        if time.monotonic() - self.fetched_at < min_age:
            return
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        loop = asyncio.get_running_loop()
        self._refreshing = loop.create_future()
        try:
            table = await self.backend.routes(self.version)
            if table.get("tasks") is not None:
                self.tasks = table["tasks"]
            self.version = table.get("version", self.version)
            self.ready = bool(table.get("ready"))
            self.health = table.get("health") or {}
            self.fetched_at = time.monotonic()
        finally:
            fut, self._refreshing = self._refreshing, None
            fut.set_result(None)

    def start(self) -> None:
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh_routes()
            except Exception as e:  # noqa: BLE001 - executor not up yet, or restarting
                log.debug("route refresh failed: %s", e)
            await asyncio.sleep(self.limits.route_refresh_s)

    def readiness(self) -> dict:
        """/readyz's body once BentoML says ready: degraded while a part is down (the
        executor's view, from the route table), yet still in rotation."""
        down = list(self.health.get("degraded") or [])
        if not down:
            return {"status": "ready"}
        return {"status": "degraded", "degraded": down, "detail": self.health.get("detail") or ", ".join(down) + " down"}

    async def route(self, task: str) -> dict | None:
        """The task's route table entry; ExecutorDown while the executor is unreachable or loading."""
        try:
            if not self.ready or time.monotonic() - self.fetched_at > 5 * self.limits.route_refresh_s + 1:
                await self.refresh_routes()
            info = self.tasks.get(task)
            if info is None or not info.get("path_id"):
                await self.refresh_routes()  # a task (or its first path) may be brand new; cheap when unchanged
                info = self.tasks.get(task)
        except ExecutorDown:
            raise
        except Exception as e:  # noqa: BLE001
            raise unavailable("executor_unavailable", f"the executor is not reachable ({type(e).__name__})") from None
        if not self.ready:
            raise ExecutorDown("the server is still loading the live paths", error="not_ready")
        return info

    async def ride_out(self, call, deadline: float):
        """`await call()` until it succeeds, sending it again with backoff while the executor is
        down (ExecutorDown: a killed executor worker that BentoML's arbiter respawns, then
        reloads the live paths), until `deadline` (time.monotonic()); then 503 with
        Retry-After. Other errors pass at once: overload, per-item errors, a failing executor.

        One call waits at most `executor_try_s` (above the executor's 5 s queue bound, after
        which it sheds with 503): an answer later than that was lost on the way (seen about
        once in 10^4 calls in a 30-minute soak: the executor logged its 200 in 40 ms and
        BentoML's client never returned it), so the call is sent again at once."""
        delay = RETRY_FIRST_S
        while True:
            left = deadline - time.monotonic()
            try_s = min(left, self.limits.executor_try_s)
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                return await asyncio.wait_for(call(), try_s)
            except asyncio.TimeoutError:
                if try_s < left:
                    metrics.EXECUTOR_RETRIES.labels(reason="lost_answer").inc()
                    log.warning("no answer from the executor within %.1fs; sending the call again", try_s)
                    continue
                metrics.OVERLOAD.labels(reason="deadline").inc()
                raise unavailable("deadline_exceeded", f"no answer within {self.limits.deadline_s:g} s; "
                                                       "retry shortly") from None
            except ExecutorDown as e:
                self.version = -1  # a successor knows other versions: take its whole route table next
                if deadline - time.monotonic() <= delay:
                    raise unavailable(e.error, f"{e}; not back within the request's deadline "
                                               f"({self.limits.deadline_s:g} s)",
                                      retry_after=2 if e.error == "not_ready" else 1) from None
                metrics.EXECUTOR_RETRIES.labels(reason=e.error).inc()
                log.debug("executor down (%s); retrying in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)

    # -- prediction ---------------------------------------------------------------------------
    async def predict(self, task: str, blobs: list[bytes] | list[str], top: int, base64: bool) -> dict:
        t0 = time.perf_counter()
        label = metrics.UNKNOWN_TASK
        code, error = 200, None
        if self.inflight >= self.limits.max_inflight:
            metrics.OVERLOAD.labels(reason="queue_full").inc()
            metrics.REQUESTS.labels(task=metrics.UNKNOWN_TASK, code="503").inc()
            metrics.REQUEST_ERRORS.labels(task=metrics.UNKNOWN_TASK, error="overloaded").inc()
            raise unavailable("overloaded", f"more than {self.limits.max_inflight} requests in flight; retry shortly")
        self.inflight += 1
        metrics.INFLIGHT.inc()
        deadline = time.monotonic() + self.limits.deadline_s
        try:
            info = await self.ride_out(lambda: self.route(task), deadline)
            if info is None:
                raise ApiError(404, "unknown_task", f"no task named {task!r}")
            label = task
            if not info.get("path_id"):
                raise ApiError(409, "no_live_path", info.get("detail") or f"task {task!r} has no live path yet "
                                                                           f"(status {info.get('status')})")
            if len(blobs) > self.limits.max_images:
                raise ApiError(413, "too_many_images", f"{len(blobs)} images in one request; at most "
                                                       f"{self.limits.max_images} are allowed")
            arrays, pixels = await self._decode(blobs, int(info.get("channels") or 3), base64)
            try:
                result = await self._run(task, info, arrays, top, deadline)
            finally:
                self._release_pixels(pixels)
            metrics.IMAGES.labels(task=task).inc(len(arrays))
            return result
        except ApiError as e:
            code, error = e.status_code, e.error
            raise
        except Exception as e:  # noqa: BLE001
            code, error = 503, "unavailable"
            log.exception("predict failed")
            raise unavailable("unavailable", f"the executor failed ({type(e).__name__}); retry shortly") from None
        finally:
            self.inflight -= 1
            metrics.INFLIGHT.dec()
            metrics.REQUESTS.labels(task=label, code=str(code)).inc()
            if error:
                metrics.REQUEST_ERRORS.labels(task=label, error=error).inc()
            else:
                metrics.REQUEST_LATENCY.labels(task=label).observe(time.perf_counter() - t0)

    def _release_pixels(self, n: int) -> None:
        with self._pixel_lock:
            self.inflight_pixels -= n

    async def _decode(self, blobs, channels: int, base64: bool) -> tuple[list[np.ndarray], int]:
        lim = self.limits

        def work():
            opened, total = [], 0
            try:
                for i, blob in enumerate(blobs):
                    what = "image" if len(blobs) == 1 else f"image {i}"
                    data = images.b64decode(blob, what) if base64 else blob
                    im = images.open_image(data, what, lim.max_image_pixels)
                    opened.append((im, what))
                    total += im.size[0] * im.size[1]
                    if total > lim.max_request_pixels:
                        raise ApiError(413, "too_many_pixels", f"the images of one request may hold at most "
                                                               f"{lim.max_request_pixels:,} pixels together")
                with self._pixel_lock:
                    if self.inflight_pixels + total > lim.max_inflight_pixels:
                        metrics.OVERLOAD.labels(reason="pixels").inc()
                        raise unavailable("overloaded", "too many image pixels in flight; retry shortly")
                    self.inflight_pixels += total
                try:
                    return [images.to_array(im, channels, what) for im, what in opened], total
                except BaseException:
                    self._release_pixels(total)
                    raise
            except images.ImageError as e:
                raise ApiError(413 if "pixels" in str(e) else 400, "invalid_image", str(e)) from None
            finally:
                for im, _ in opened:
                    im.close()

        return await run_in_threadpool(work)

    async def _run(self, task: str, info: dict, arrays: list[np.ndarray], top: int, deadline: float) -> dict:
        # The executor resolves the task's current path when the batch runs, not the gateway's
        # route table (up to one refresh old), so a swap reaches clients as soon as it is installed.
        path_id = None
        for attempt in range(2):
            items = [Item(task=task, pixels=a, path_id=path_id, top=top) for a in arrays]
            try:
                results = await self.ride_out(lambda: self.backend.infer(items), deadline)
            except Overloaded:
                metrics.OVERLOAD.labels(reason="executor_queue").inc()
                raise unavailable("overloaded", "the executor's queue is full; retry shortly") from None
            except Outage as e:
                raise unavailable("executor_unavailable", str(e)) from None
            errors = [r for r in results if r.error]
            if errors:
                err = errors[0]
                if err.error == "unknown_task":
                    raise ApiError(404, "unknown_task", err.detail or f"no task named {task!r}")
                if err.error == "no_live_path":
                    raise ApiError(409, "no_live_path", err.detail or f"task {task!r} has no live path")
                raise ApiError(400, err.error, err.detail or "invalid input")
            paths = {r.path_id for r in results}
            if len(paths) == 1:
                break
            path_id = results[-1].path_id  # a swap split this request across paths: rerun it all on one
        else:
            raise unavailable("swapping", "the task's path changed during the request; retry")
        classes = info.get("classes") or []

        def name(label: int) -> str:
            return str(classes[label]) if 0 <= label < len(classes) else str(label)

        predictions = []
        for r in results:
            best_label, best_score = r.top[0]
            predictions.append({
                "label": best_label, "class": name(best_label), "score": best_score,
                "top": [{"class": name(lab), "label": lab, "score": p} for lab, p in r.top],
            })
        return {"task": task, "path_id": results[0].path_id, "predictions": predictions}


# -- middleware ------------------------------------------------------------------------------------

class TooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "payload_too_large", f"the request body is larger than {limit:,} bytes")


def _json_response_bytes(status: int, body: dict, headers: dict[str, str] | None = None) -> tuple[dict, bytes]:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, data


class Guard:
    """Pure ASGI middleware: bearer token on mutating /tasks routes before the body is read,
    and the body limit (Content-Length up front, then a running count)."""

    def __init__(self, app, get_gateway):
        self.app = app
        self.get_gateway = get_gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gw = self.get_gateway()
        limits = gw.limits if gw else Limits.from_env()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        upload = method == "POST" and path.rstrip("/") == "/tasks"
        limit = limits.max_upload_bytes if upload else limits.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if gw is not None and needs_token(gw, method, path):
            if not gw.api_token:
                detail = "MUNET_PROTECT_PREDICT=1 but the server has no MUNET_API_TOKEN: inference is closed"
            elif not check_token(headers.get("authorization"), gw.api_token):
                detail = "this route needs 'Authorization: Bearer <MUNET_API_TOKEN>'"
            else:
                detail = None
            if detail:
                start, body = _json_response_bytes(401, error_body("unauthorized", detail),
                                                   {"WWW-Authenticate": "Bearer"})
                await _drain_and_send(receive, send, start, body)
                return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                start, body = _json_response_bytes(413, error_body("payload_too_large",
                                                   f"the request body is larger than {limit:,} bytes"))
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLarge(limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except TooLarge as e:
            if not started:
                start, body = _json_response_bytes(413, error_body(e.error, e.detail))
                await send(start)
                await send({"type": "http.response.body", "body": body})


async def _drain_and_send(receive, send, start, body) -> None:
    await send(start)
    await send({"type": "http.response.body", "body": body})


PREDICT_ROUTES = ("/predict", "/predict/upload")


def needs_token(gw: Gateway, method: str, path: str) -> bool:
    """Task changes (POST/PUT/PATCH/DELETE under /tasks) when the server has a token; with
    MUNET_PROTECT_PREDICT=1 inference too, token or not (fail closed)."""
    path = "/" + path.strip("/")
    if method in PROTECTED_METHODS and (path == "/tasks" or path.startswith("/tasks/")):
        return bool(gw.api_token)
    return gw.protect_predict and path in PREDICT_ROUTES


def check_token(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))


class RefusePickle:
    """ASGI middleware for both services: a pickled body (BentoML's format between its own
    services) is refused with 415 before anything reads it. BentoML's entry service already
    refuses its exact media type; the executor would unpickle it, and unpickling runs code,
    so the gateway calls the executor with JSON (`service.executor_client`)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            ctype = b""
            for k, v in scope.get("headers", []):
                if k.lower() == b"content-type":
                    ctype = v.lower()
            if b"pickle" in ctype:
                start, body = _json_response_bytes(415, error_body("unsupported_media_type",
                                                   "pickled bodies are never accepted; send JSON"))
                await _drain_and_send(receive, send, start, body)
                return
        await self.app(scope, receive, send)


async def _rewrite_response(app, scope, receive, send, hold, rewrite) -> None:
    """Run `app`, holding back each response whose start message `hold(start)` picks: its body
    is collected and `rewrite(status, headers, body)` says what goes out instead, a
    `_json_response_bytes` pair, or None to send the response unchanged."""
    held: dict | None = None
    chunks: list[bytes] = []

    async def wrapped_send(message):
        nonlocal held
        if message["type"] == "http.response.start" and hold(message):
            held = message
            return
        if held is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        data = b"".join(chunks)
        out = rewrite(held["status"], held.get("headers", []), data)
        start, data = out if out is not None else (held, data)
        await send(start)
        await send({"type": "http.response.body", "body": data})

    await app(scope, receive, wrapped_send)


class JsonErrors:
    """ASGI middleware for the whole BentoML app: error responses that are not JSON (BentoML's
    own 404, 405, /readyz 503, its concurrency limit) get the {"error","detail"} body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        def hold(start) -> bool:
            ctype = b""
            for k, v in start.get("headers", []):
                if k.lower() == b"content-type":
                    ctype = v
            return start["status"] >= 400 and b"json" not in ctype

        def rewrite(status, headers, data):
            text = data.decode("utf-8", "replace").strip() or _STATUS_CODES.get(status, "error")
            extra = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                     if k.lower() in (b"retry-after", b"www-authenticate", b"allow")}
            if status == 503 and "Retry-After" not in {k.title() for k in extra}:
                extra["Retry-After"] = "1"
            return _json_response_bytes(status, error_body(_STATUS_CODES.get(status, "error"), text[:500]), extra)

        await _rewrite_response(self.app, scope, receive, send, hold, rewrite)


class Readiness:
    """ASGI middleware for the whole BentoML app: BentoML answers `GET /readyz` (200 once every
    live path is loaded, through `__is_ready__`); this gives the answer a JSON body. 200 stays
    200, so an outage of PostgreSQL or Redis never takes the server out of rotation, but the
    body says so: `{"status": "ready"}` or `{"status": "degraded", "degraded": ["database"],
    "detail": ...}` (the gateway's `readiness()`, from the route table it polls anyway). A 503
    becomes `{"error": "not_ready", ...}` with Retry-After."""

    def __init__(self, app, get_gateway):
        self.app = app
        self.get_gateway = get_gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/readyz" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)

        def rewrite(status, headers, data):
            if status == 200:
                gw = self.get_gateway()
                return _json_response_bytes(200, gw.readiness() if gw is not None else {"status": "ready"})
            if status == 503:
                why = data.decode("utf-8", "replace").strip()[:200]
                return _json_response_bytes(503, error_body("not_ready", "the live paths are not loaded yet, or the "
                                                            f"executor is restarting; retry shortly ({why})"),
                                            {"Retry-After": "2"})
            return None

        await _rewrite_response(self.app, scope, receive, send, lambda start: True, rewrite)


class IndexPage:
    """ASGI middleware for the whole BentoML app: `GET /` is the web page. BentoML routes `/`
    to its own Swagger page before the mounted app sees it; the API docs stay at /docs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == "/" and scope.get("method") in ("GET", "HEAD"):
            scope = {**scope, "path": "/ui", "raw_path": b"/ui"}
        await self.app(scope, receive, send)


STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")

# -- the app ---------------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="MUNET_API_TOKEN, required when the server has one")


def create_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.gateway is not None:
            app.state.gateway.start()
        yield
        if app.state.gateway is not None:
            await app.state.gateway.stop()

    app = FastAPI(
        lifespan=lifespan,
        title="munet",
        version="0.1.0",
        description="A continual multitask model server: per-task inference on evolving paths, task submission, "
                    "lineage. Every error is {\"error\": CODE, \"detail\": TEXT}.",
        responses={400: {"model": ErrorResponse}},
    )
    app.state.gateway = None
    app.add_middleware(Guard, get_gateway=lambda: app.state.gateway)

    def gateway() -> Gateway:
        gw = app.state.gateway
        if gw is None:
            raise unavailable("starting", "the server is starting")
        return gw

    def system(gw: Gateway):
        if gw.system is None:
            raise unavailable("no_database", "this server has no task database attached")
        return gw.system

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        error = getattr(exc, "error", None) or _STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(error_body(error, exc.detail), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body("invalid_request", _validation_detail(exc)), status_code=400)

    # -- inference ------------------------------------------------------------------------
    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, tags=["inference"],
              summary="Classify base64 images with a task's live path")
    async def predict(body: PredictRequest,
                      _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        gw = gateway()
        blobs = [body.image] if body.image is not None else list(body.images or [])
        return await gw.predict(body.task, blobs, body.top, base64=True)

    @app.post("/predict/upload", response_model=PredictResponse, responses=ERRORS, tags=["inference"],
              summary="Classify uploaded image files (multipart: task, files, top)")
    async def predict_upload(form: Annotated[UploadForm, Form()],
                             _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        gw = gateway()
        task, files, top = form.task, form.files, form.top
        if len(files) > gw.limits.max_images:
            raise ApiError(413, "too_many_images", f"{len(files)} images in one request; at most "
                                                   f"{gw.limits.max_images} are allowed")
        blobs = [await f.read() for f in files]
        return await gw.predict(task, blobs, top, base64=False)

    # -- tasks ------------------------------------------------------------------------------
    @app.get("/tasks", tags=["tasks"], summary="All tasks (not deleted)", responses=ERRORS)
    async def list_tasks() -> list[dict]:
        return await _db(system(gateway()).tasks_json)

    @app.post("/tasks", status_code=201, tags=["tasks"], responses={**ERRORS, 201: {"description": "the task"}},
              summary="Submit a task: multipart 'name' and 'file' (.npz, or a zip/tar of an ImageFolder tree)")
    async def add_task(form: Annotated[TaskForm, Form()],
                       _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        from munet.storage.commit import CommitError
        from munet.storage.datasets import DatasetError
        from munet.storage.schema import validate_task_name

        gw = gateway()
        name, file, root = form.name, form.file, form.root
        sys_ = system(gw)
        try:
            validate_task_name(name)
        except ValueError as e:
            raise ApiError(400, "invalid_name", str(e)) from None
        filename = os.path.basename((file.filename or "").replace("\\", "/"))[:200] or None
        data = await file.read()
        if not data:
            raise ApiError(400, "empty_file", "the uploaded data set file is empty")
        try:
            await _db(sys_.add_task, name, data, root=root, filename=filename)
        except DatasetError as e:
            raise ApiError(400, "invalid_dataset", str(e)) from None
        except CommitError as e:
            text = str(e)
            if "exists already" in text:
                raise ApiError(409, "task_exists", text) from None
            raise ApiError(400, "invalid_task", text) from None
        del data
        view = await _db(sys_.task_json, name)
        await _poke(gw)
        return view

    @app.get("/tasks/{name}", tags=["tasks"], responses=ERRORS,
             summary="One task: status, live path, accuracy, accounted params, candidates tried, last improvement")
    async def show_task(name: Annotated[str, Path(max_length=200)]) -> dict:
        sys_ = system(gateway())
        _known_name(name)
        try:
            return await _db(sys_.task_json, name)
        except KeyError:
            raise ApiError(404, "unknown_task", f"no task named {name!r}") from None

    @app.get("/tasks/{name}/lineage", tags=["tasks"], responses=ERRORS,
             summary="Path ancestry and, per component, the task that created it and the tasks sharing it")
    async def task_lineage(name: Annotated[str, Path(max_length=200)]) -> dict:
        sys_ = system(gateway())
        _known_name(name)
        out = await _db(lineage_json, sys_, name)
        if out is None:
            raise ApiError(404, "unknown_task", f"no task named {name!r}")
        return out

    @app.delete("/tasks/{name}", tags=["tasks"], responses=ERRORS,
                summary="Delete a task: stops its evolution and serving; lineage rows stay; blobs go at the next gc")
    async def delete_task(name: Annotated[str, Path(max_length=200)],
                          _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        gw = gateway()
        sys_ = system(gw)
        _known_name(name)
        view = await _db(mark_deleted, sys_, name)
        if view is None:
            raise ApiError(404, "unknown_task", f"no task named {name!r}")
        await _poke(gw)
        return view

    @app.put("/tasks/{name}/pin", tags=["tasks"], responses=ERRORS,
             summary="Pin a task to one of its recorded paths (rollback); evolution keeps searching but does not move it")
    async def pin_task(name: Annotated[str, Path(max_length=200)], body: PinRequest,
                       _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await _pin(gateway(), name, body.path_id)

    @app.delete("/tasks/{name}/pin", tags=["tasks"], responses=ERRORS, summary="Unpin a task")
    async def unpin_task(name: Annotated[str, Path(max_length=200)],
                         _auth: HTTPAuthorizationCredentials | None = Depends(bearer)) -> dict:
        return await _pin(gateway(), name, None)

    async def _pin(gw: Gateway, name: str, path_id: str | None) -> dict:
        from munet.storage import commit, signals

        sys_ = system(gw)
        _known_name(name)
        try:
            view = await _db(sys_.task_json, name)
        except KeyError:
            raise ApiError(404, "unknown_task", f"no task named {name!r}") from None
        try:
            await _db(commit.set_pin, sys_.Session, name, path_id)
        except commit.CommitError as e:
            raise ApiError(404 if "no task" in str(e) else 400, "invalid_pin", str(e)) from None
        view = await _db(sys_.task_json, name)
        live = view.get("live_path")
        if live:
            await run_in_threadpool(signals.publish, sys_.settings.redis_url, signals.SWAPS,
                                    signals.swap_message(name, live["id"], live["score"]))
        await _poke(gw)
        return view

    # -- operations ------------------------------------------------------------------------
    @app.get("/", tags=["operations"], include_in_schema=False)
    @app.get("/ui", tags=["operations"], include_in_schema=False)
    async def web_page():
        from fastapi.responses import FileResponse

        return FileResponse(os.path.join(STATIC_DIR, "index.html"), media_type="text/html")

    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")  # the page's script and stylesheet

    @app.get("/system/graph", tags=["operations"], responses=ERRORS,
             summary="The multitask system: every task's live path and each live component once, with its creator")
    async def system_graph() -> dict:
        from .overview import graph_json

        return await _db(graph_json, system(gateway()))

    @app.get("/system/history", tags=["operations"], responses=ERRORS,
             summary="Every task's score over time: live-pointer moves (swaps) and scored candidates")
    async def system_history() -> dict:
        from .overview import history_json

        return await _db(history_json, system(gateway()))

    @app.get("/status", tags=["operations"], responses=ERRORS,
             summary="Serving state: tasks and their paths, database and Redis health, cache, swap failures")
    async def status() -> dict:
        gw = gateway()
        try:
            out = await asyncio.wait_for(gw.backend.status(), 10)
        except Exception as e:  # noqa: BLE001
            raise unavailable("executor_unavailable", f"the executor is not reachable ({type(e).__name__})") from None
        out["gateway"] = {"inflight_requests": gw.inflight, "route_table_version": gw.version,
                          "limits": {k: getattr(gw.limits, k) for k in gw.limits.__dataclass_fields__},
                          "auth": bool(gw.api_token)}
        return out

    return app


def _known_name(name: str) -> None:
    if not TASK_NAME.fullmatch(name):
        raise ApiError(404, "unknown_task", f"no task named {name[:80]!r} (task names use a-z, 0-9, '_' and '-')")


async def _db(fn, *args, **kwargs):
    """Run a database call in a thread; an unreachable database is an outage (503)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except (OperationalError, DBAPIError) as e:
        log.warning("database call failed: %s", e)
        raise unavailable("database_unavailable", "the database is not reachable; serving continues, "
                                                  "task routes are back when it is", retry_after=5) from None


async def _poke(gw: Gateway) -> None:
    """Ask the executor to re-read SQL now, then refresh the route table (best effort)."""
    try:
        await asyncio.wait_for(gw.backend.refresh(), 30)
        await gw.refresh_routes()
    except Exception as e:  # noqa: BLE001 - the next poll picks the change up anyway
        log.info("refresh after a task change failed: %s", e)


def lineage_json(system, name: str) -> dict | None:
    from sqlalchemy import select

    from munet.storage import lineage
    from munet.storage.schema import Component, PathRow, Root, Task

    def iso(t: dt.datetime | None) -> str | None:
        return t.replace(tzinfo=dt.timezone.utc).isoformat() if t else None

    with system.ReadSession() as s:
        task = s.scalar(select(Task).where(Task.name == name, Task.status != "deleted"))
        if task is None:
            return None
        task_names = dict(s.execute(select(Task.id, Task.name)).all())
        root_names = dict(s.execute(select(Root.id, Root.name)).all())
        chain = lineage.ancestry(s, task.live_path_id) if task.live_path_id else []
        history = lineage.live_history(s, task.id)
        users = lineage.component_users(s)
        components = []
        if task.live_path_id:
            ids = lineage.path_component_ids(s, task.live_path_id)
            rows = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(ids)))}
            for pos, cid in enumerate(ids):
                c = rows[cid]
                components.append({
                    "position": pos, "id": c.id, "name": c.name, "params": c.num_params,
                    "created_by": task_names.get(c.task_id) if c.task_id else None,
                    "root": root_names.get(c.root_id) if c.task_id is None else None,
                    "created_in_path": c.path_id, "cloned_from": c.parent_id,
                    "shared_with": sorted(users.get(cid, set()) - {name}),
                    "used_by": sorted(users.get(cid, set())),
                })
        paths = [{"id": p.id, "parent_id": p.parent_id, "task": task_names.get(p.task_id) if p.task_id else None,
                  "root": root_names.get(p.root_id) if p.task_id is None else None,
                  "score": p.score, "val_acc": p.val_acc, "test_acc": p.test_acc,
                  "accounted_params": p.accounted_params, "image_size": p.image_size, "created_at": iso(p.created_at)}
                 for p in chain]
        moves = [{"path_id": h.path_id, "previous_path_id": h.previous_path_id, "score": h.score, "reason": h.reason,
                  "at": iso(h.at)} for h in history]
        live = s.get(PathRow, task.live_path_id) if task.live_path_id else None
        return {"task": name, "live_path_id": live.id if live else None, "ancestry": paths,
                "components": components, "live_history": moves}


def mark_deleted(system, name: str) -> dict | None:
    """DELETE /tasks/{name}: status 'deleted' (evolvers skip it, commits refuse it, servers drop
    it); rows stay for lineage; its private blobs become unreferenced and `munet gc` collects them."""
    from sqlalchemy import select

    from munet.storage import signals
    from munet.storage.schema import Task, utcnow

    with system.Session.begin() as s:
        task = s.scalar(select(Task).where(Task.name == name, Task.status != "deleted"))
        if task is None:
            return None
        task.status = "deleted"
        task.deleted_at = utcnow()
    signals.publish(system.settings.redis_url, signals.TASKS, {"task": name})
    view = system.task_json(name)
    return view


app = create_app()
