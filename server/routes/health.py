"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """503 until every registry model that should be served has its workers loaded."""
    service = request.app.state.service
    pool = request.app.state.pool
    missing = {name: reason for name, reason in pool.failed.items()}
    for m in service.registry.served:
        p = pool.get(m.spec.id)
        if p is None and m.spec.id not in missing:
            missing[m.spec.id] = "not loaded"
        elif p is not None and not p.available:
            missing[m.spec.id] = "unavailable after repeated worker crashes"
        elif p is not None and p.alive == 0:
            missing[m.spec.id] = "no live workers"
    models = {
        name: {"available": p.available, "workers": p.spec.workers, "alive": p.alive, "busy": p.busy, "queued": len(p.pending),
               "restarts": p.restarts,
               "worker_pids": [w.process.pid for w in p.workers if w.alive]}
        for name, p in pool.models.items()
    }
    body = {"status": "ready" if not missing else "not_ready", "models": models, "missing": missing,
            "skipped": service.registry.skipped}
    return JSONResponse(body, status_code=200 if not missing else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
