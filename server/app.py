"""The app factory: lifespan starts and stops the worker pool; state lives on app.state."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from backends.engine_api import FAILED, Engines
from backends.jobs import PoolModel, PoolPolicy
from backends.worker_pool import WorkerPool  # the one place that picks the engine
from backends.registry import Registry, locate_registry, resolve
from server.docs import install_docs
from server.errors import install_error_handlers
from server.lifecycle import Lifecycle
from server.metrics import Metrics
from server.middleware import RequestContext
from server.responses.service import ResponsesService
from server.responses.store import store_for
from server.routes import embeddings, health, openai, responses_api, ui
from server.security import load_api_keys, open_paths, startup_notes
from server.service import InferenceService
from server.settings import Settings

log = logging.getLogger("gpt4all_j_server")


def pool_models(registry: Registry, settings: Settings) -> list[PoolModel]:
    """What the pool needs for each servable registry entry."""
    return [
        PoolModel(
            name=m.spec.id, path=str(m.path), workers=m.spec.workers, threads=m.threads,
            batch_size=m.spec.batch_size, prefix_cache=m.spec.prefix_cache,
            flush_interval=settings.token_batch_ms / 1000,
            pieces=tuple(m.tokenizer.pieces), engine=m.spec.engine, slots=m.spec.slots,
            n_ctx=m.context_length if m.spec.engine == "ggml" else None,
            max_queue=m.spec.max_queue if m.spec.max_queue is not None else settings.default_max_queue,
        )
        for m in registry.served
    ]


def pool_policy(settings: Settings) -> PoolPolicy:
    """Queue, crash and stall limits from the settings."""
    return PoolPolicy(queue_timeout=settings.queue_timeout, restart_limit=settings.restart_limit,
                      restart_window=settings.restart_window, restart_cooldown=settings.restart_cooldown,
                      stall_timeout=settings.worker_stall_timeout)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """Build the FastAPI app; the registry is loaded now (so errors surface before serving)."""
    settings = settings or Settings()
    keys = load_api_keys(settings)
    registry = registry or resolve(locate_registry(settings.registry, settings.data_dir),
                                   create_missing=settings.create_demo, default_threads=settings.default_threads,
                                   max_workers=settings.max_workers, memory_budget_mb=settings.memory_budget_mb)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        lifecycle: Lifecycle = app.state.lifecycle
        pool = WorkerPool(pool_models(registry, settings), load_timeout=settings.load_timeout,
                          policy=pool_policy(settings))
        if not await _start_unless_stopped(pool, lifecycle):
            yield  # a signal came during the load: serve nothing, let the server exit at once
            return
        metrics.watch_pool(pool)
        app.state.pool = pool
        app.state.service = InferenceService(registry, pool, settings, metrics)
        store = store_for(settings.responses_db, settings.data_dir, settings.responses_max_stored,
                          settings.responses_ttl_days)
        app.state.responses = ResponsesService(app.state.service, store, settings.max_body_bytes)
        _log_startup(registry, pool)
        try:
            yield
        finally:
            await pool.stop()
            store.close()

    app = FastAPI(title="gpt4all-j-server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible server for GPT4All-J and other GGML GPT-J models.")
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.lifecycle = Lifecycle(settings.shutdown_grace)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(embeddings.router)
    app.include_router(responses_api.router)
    app.include_router(ui.router)
    app.include_router(health.router)
    install_docs(app)
    _add_middleware(app, settings, metrics, keys)
    for level, message in startup_notes(settings, keys):
        log.log(level, message)
    return app


async def _start_unless_stopped(pool: Engines, lifecycle: Lifecycle) -> bool:
    """Load the models, unless SIGTERM/SIGINT arrives first: then stop loading at once (False)."""
    start = asyncio.ensure_future(pool.start())
    stop = asyncio.ensure_future(lifecycle.stopping.wait())
    await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if start.done():
        start.result()
        return True
    log.warning("stop requested while models were loading: loading abandoned")
    start.cancel()
    try:
        await start
    except asyncio.CancelledError:
        pass
    await pool.stop()
    return False


def _add_middleware(app: FastAPI, settings: Settings, metrics: Metrics, keys: list[str]) -> None:
    """The request context (id, auth, body cap, access log) inside CORS, so every answer gets CORS headers."""
    app.add_middleware(RequestContext, keys=keys, open_paths=open_paths(settings),
                       max_body=settings.max_body_bytes, metrics=metrics, log_requests=settings.access_log)
    if settings.cors_origins:  # added last = outermost: answers preflights, decorates 401/413 too
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])


def _log_startup(registry: Registry, pool: Engines) -> None:
    """Say plainly what is served and what was skipped and why."""
    statuses = pool.status()
    for name, s in statuses.items():
        if s.started:
            log.info("serving %s with %d worker(s)", name, s.alive)
    for name, reason in registry.skipped.items():
        log.warning("not serving %s: %s", name, reason)
    for name, s in statuses.items():
        if s.state == FAILED:
            log.warning("not serving %s yet: it failed to load and is being retried (%s)", name, s.problem)
