"""Liveness, readiness and metrics.

/ready tells everyone whether the server is ready and each model's state; the details (worker counts,
pids, restarts, the reasons a model is not served, which can quote file paths and contents) go only to
callers with a valid key, or, when no keys are set, to clients on this machine (server.security).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.security import sees_details

router = APIRouter()


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> JSONResponse:
    """503 until every registry model that should be served has live workers; details for trusted callers."""
    registry = request.app.state.registry
    pool = getattr(request.app.state, "pool", None)  # absent until the models are loaded
    models, missing = model_states(registry, pool)
    body: dict = {"status": "ready" if not missing else "not_ready",
                  "models": {name: {"state": m["state"]} for name, m in models.items()}}
    record = getattr(request.state, "record", None)
    if sees_details(getattr(record, "key_ok", None), request.scope.get("client")):
        body.update(models=models, missing=missing, skipped=dict(registry.skipped))
    return JSONResponse(body, status_code=200 if not missing else 503)


def model_states(registry, pool) -> tuple[dict[str, dict], dict[str, str]]:
    """Every registry entry's state and details, and the served models that are not ready (with why)."""
    failed = pool.failed if pool is not None else {}
    models: dict[str, dict] = {}
    missing: dict[str, str] = {}
    for m in registry.served:
        name = m.spec.id
        p = pool.get(name) if pool is not None else None
        if p is None:
            state, problem = ("failed", failed[name]) if name in failed else ("loading", "not loaded yet")
            missing[name] = problem
            models[name] = _idle_entry(state, m.spec.workers, problem)
            continue
        problem = getattr(p, "problem", None)
        if not p.available:
            state = "unavailable"
            missing[name] = problem or "unavailable after repeated worker crashes"
        elif p.alive == 0:
            state = "restarting"
            missing[name] = problem or "no live workers"
        else:
            state = "ready"
        models[name] = {"state": state, "available": p.available, "workers": p.spec.workers, "alive": p.alive,
                        "busy": p.busy, "queued": len(p.pending), "restarts": p.restarts,
                        "worker_pids": [w.process.pid for w in p.workers if w.alive], "problem": problem}
    for name, reason in registry.skipped.items():
        models[name] = _idle_entry("not_downloaded" if name in registry.not_downloaded else "skipped",
                                    _workers(registry, name), reason)
    return models, missing


def _idle_entry(state: str, workers: int, problem: str | None) -> dict:
    """Details of a model without running workers (same fields as a served one)."""
    return {"state": state, "available": False, "workers": workers, "alive": 0, "busy": 0, "queued": 0,
            "restarts": 0, "worker_pids": [], "problem": problem}


def _workers(registry, name: str) -> int:
    return next((spec.workers for spec in registry.entries if spec.id == name), 0)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
