"""The BentoML 1.4 service (`bentoml serve munet.server.service:Munet`, `munet serve`).

Two services, as DESIGN.md fixes:

- `Munet`, the entry service, mounts the FastAPI app of `server.api` (REST routes, auth,
  413, error bodies, OpenAPI at /openapi.json). Its /predict validates and decodes, resolves
  the task's path once per request and calls...
- `MunetExecutor`, an inner service reached through `bentoml.depends`. BentoML runs it in
  its own worker process behind a Unix socket (loopback TCP where sockets are unavailable),
  never on a public port; only it accepts BentoML's pickle bodies, which the entry service
  refuses (BentoML's own check). Its batchable `infer` takes ONE batch parameter, a list of
  images (each with its task and path), so BentoML's adaptive batching collects images of
  many requests and tasks and the executor runs shared stages once (`server.executor`).
  It owns the module cache and the swap listener, started in `@bentoml.on_startup`.

BentoML's own /readyz asks `__is_ready__` of both services (ready once the live paths are
loaded; it stays ready while the database is down); `api.Readiness` gives its answer a JSON
body that says what is down (`{"status": "degraded", "degraded": ["database"], ...}`). Its
/metrics aggregates every worker's Prometheus metrics (multiprocess mode; `server.metrics`).

A killed executor worker is respawned by BentoML's arbiter; the gateway rides out the
restart (`api.Gateway.ride_out`): a call that fails at the connection level, or that the
successor answers with "still loading", is sent again with backoff until the request's
deadline, so clients see the restart as latency, not as errors.
"""
from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated

import bentoml
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from munet.settings import Settings

from . import api
from .protocol import Item, Result

log = logging.getLogger("munet.server")


def _log_to_stderr() -> None:
    """Swap and load messages in the server's log (BentoML configures only its own loggers)."""
    logger = logging.getLogger("munet")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("MUNET_LOG_LEVEL", "INFO").upper())


def _env(name: str, default, cast=float):
    try:
        return cast(os.environ.get(name, default))
    except (TypeError, ValueError):
        return cast(default)


MAX_BATCH = _env("MUNET_MAX_BATCH", 64, int)          # images per executed batch
MAX_LATENCY_MS = _env("MUNET_MAX_LATENCY_MS", 5000, int)  # BentoML sheds queued work older than this (503)


class InferItem(BaseModel):
    """One image on its way to the executor (raw uint8 pixels, row-major [H, W, C])."""

    # JSON between the services (never pickle, see `executor_client`): pixels travel as base64.
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    task: Annotated[str, Field(max_length=63)]
    path_id: Annotated[str | None, Field(max_length=64)] = None
    pixels: bytes
    shape: tuple[int, int, int]
    top: Annotated[int, Field(ge=1, le=1000)] = 5


class InferResult(BaseModel):
    path_id: str | None = None
    top: list[tuple[int, float]] = []
    error: str | None = None
    detail: str | None = None


def _to_item(it: InferItem) -> Item:
    h, w, c = it.shape
    if h < 1 or w < 1 or c not in (1, 3) or len(it.pixels) != h * w * c:
        return Item(task=it.task, pixels=np.zeros((0, 0, 0), np.uint8), path_id=it.path_id, top=it.top)
    return Item(task=it.task, pixels=np.frombuffer(it.pixels, dtype=np.uint8).reshape(h, w, c),
                path_id=it.path_id, top=it.top)


@bentoml.service(name="MunetExecutor", workers=1, traffic={"timeout": 120})
class MunetExecutor:
    """Module cache, path table, swap listener, cross-task batch execution."""

    def __init__(self) -> None:
        import torch

        from munet.system import System

        from .executor import Executor
        from .swap import SwapListener

        _log_to_stderr()
        threads = _env("MUNET_SERVE_THREADS", 0, int) or (os.cpu_count() or 1)
        torch.set_num_threads(threads)
        self.settings = Settings.from_env()
        self.system = System(self.settings)
        self.executor = Executor(grace=_env("MUNET_SWAP_GRACE_S", 30.0))
        self.listener = SwapListener(self.system, self.executor, poll_interval=_env("MUNET_SWAP_POLL_S", 2.0),
                                     probe_rtol=_env("MUNET_PROBE_RTOL", 1e-4), probe_atol=_env("MUNET_PROBE_ATOL", 1e-4),
                                     redis_url=self.settings.redis_url)

    @bentoml.on_startup
    def start_listener(self) -> None:
        self.listener.start()

    @bentoml.on_shutdown
    def stop_listener(self) -> None:
        self.listener.stop()
        self.system.engine.dispose()

    def __is_ready__(self) -> bool:
        return self.listener.ready.is_set()

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, items: list[InferItem]) -> list[InferResult]:
        if not self.listener.ready.is_set():  # a restarted executor knows no task yet: not ready (retried), not a 404
            return [InferResult(error="not_ready", detail="the executor is still loading the live paths") for _ in items]
        try:
            results = self.executor.infer([_to_item(it) for it in items])
        except Exception as e:  # noqa: BLE001 - reported per item; the gateway answers 503
            log.exception("batch failed")
            results = [Result(error="executor_error", detail=f"{type(e).__name__}: {str(e)[:200]}") for _ in items]
        return [InferResult(path_id=r.path_id, top=r.top, error=r.error, detail=r.detail) for r in results]

    @bentoml.api
    def routes(self, since: int = -1) -> dict:
        from .swap import route_table

        return route_table(self.executor, self.listener.ready.is_set(), since, self.listener.health())

    @bentoml.api
    def status(self) -> dict:
        return self.listener.status()

    @bentoml.api
    def refresh(self) -> dict:
        return self.listener.sync()


class BentoBackend:
    """The gateway's view of the executor service (a BentoML RemoteProxy)."""

    def __init__(self, proxy):
        self.proxy = proxy

    @property
    def _client(self):
        return getattr(self.proxy, "to_async", self.proxy)

    async def _call(self, name: str, *args, **kwargs):
        """Call an executor API. Calls are idempotent, so a connection the executor closed
        while idle (keep-alive race) gets two quick tries more; a transport error after that
        is `api.ExecutorDown`, which the gateway retries until the request's deadline (a
        restarting executor). An HTTP error answer is not retried: 429/503 is overload."""
        from bentoml.exceptions import BentoMLException

        for attempt in range(3):
            try:
                return await getattr(self._client, name)(*args, **kwargs)
            except BentoMLException as e:
                code = int(getattr(e, "error_code", 500))
                if code in (429, 503):
                    raise api.Overloaded(str(e)) from None
                raise api.Outage(f"the executor failed ({code})") from None
            except Exception as e:  # noqa: BLE001 - aiohttp/httpx transport errors, OSError
                transport = isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("aiohttp", "httpx", "httpcore", "anyio")
                if not transport:
                    raise
                if attempt == 2:
                    raise api.ExecutorDown(f"the executor is not reachable ({type(e).__name__})") from None
                await asyncio.sleep(0.05 * (attempt + 1))

    async def infer(self, items: list[Item]) -> list[Result]:
        payload = [InferItem(task=i.task, path_id=i.path_id, pixels=i.pixels.tobytes(),
                             shape=tuple(int(d) for d in i.pixels.shape), top=i.top) for i in items]
        out = await self._call("infer", payload)
        results = []
        for o in out:
            d = o if isinstance(o, dict) else o.model_dump()
            results.append(Result(path_id=d.get("path_id"), top=[(int(a), float(b)) for a, b in d.get("top") or []],
                                  error=d.get("error"), detail=d.get("detail")))
        if any(r.error == "not_ready" for r in results):  # a restarted executor loading its live paths
            raise api.ExecutorDown(next(r.detail for r in results if r.error == "not_ready"), error="not_ready")
        if any(r.error == "executor_error" for r in results):
            raise api.Outage(next(r.detail for r in results if r.error == "executor_error"))
        return results

    async def routes(self, since: int) -> dict:
        return await self._call("routes", since=since)

    async def status(self) -> dict:
        return await self._call("status")

    async def refresh(self) -> dict:
        return await self._call("refresh")


def executor_client(svc: "Munet"):
    """The executor as a JSON client. `bentoml.depends` would talk pickle to it (BentoML's
    default between its own services), so whoever reached its socket could run code in it;
    the executor refuses pickle (`api.RefusePickle`) and the gateway speaks JSON."""
    from _bentoml_impl.client import RemoteProxy
    from bentoml._internal.configuration.containers import BentoMLContainer

    url = BentoMLContainer.remote_runner_mapping.get().get(MunetExecutor.name)
    if url is None:
        return svc.executor  # the executor runs in this process: plain calls, no HTTP
    return RemoteProxy(url, service=MunetExecutor, media_type="application/json")


@bentoml.service(name="Munet", workers=1, traffic={"timeout": 300})
@bentoml.asgi_app(api.app, path="/")
class Munet:
    """The entry service: REST routes of `server.api`; inference goes to `MunetExecutor`."""

    executor = bentoml.depends(MunetExecutor)

    def __init__(self) -> None:
        from munet.system import System

        _log_to_stderr()
        # No torch here (decoding is PIL and numpy; System imports torch only to build
        # modules), so this process weighs ~100 MB rather than ~800; the executor owns the cores.
        settings = Settings.from_env()
        self.gateway = api.Gateway(BentoBackend(executor_client(self)), System(settings), api.Limits.from_env(),
                                   api_token=settings.api_token)
        api.app.state.gateway = self.gateway

    @bentoml.on_startup
    async def connect_executor(self) -> None:
        # BentoML sets up the clients of `bentoml.depends` itself; ours (`executor_client`) here.
        client = self.gateway.backend.proxy
        if hasattr(client, "__aenter__"):
            await client.__aenter__()

    async def __is_ready__(self) -> bool:
        try:
            await self.gateway.refresh_routes()
        except Exception:  # noqa: BLE001
            return False
        return self.gateway.ready


Munet.add_asgi_middleware(api.JsonErrors)
Munet.add_asgi_middleware(api.RefusePickle)
MunetExecutor.add_asgi_middleware(api.RefusePickle)
Munet.add_asgi_middleware(api.IndexPage)  # GET / is the web page, not BentoML's Swagger page
Munet.add_asgi_middleware(api.Readiness, get_gateway=lambda: api.app.state.gateway)  # /readyz says what is down
