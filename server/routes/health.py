"""Liveness, readiness and metrics.

/ready tells everyone whether the server is ready and each model's state; the details (worker counts,
pids, restarts, the reasons a model is not served, which can quote file paths and contents) go only to
callers with a valid key, or, when no keys are set, to clients on this machine (server.security).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends.engine_api import LOADING, READY, RESTARTING, UNAVAILABLE, Engines
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


def model_states(registry, pool: Engines | None) -> tuple[dict[str, dict], dict[str, str]]:
    """Every registry entry's state and details, and the served models that are not ready (with why),
    from the engines' status snapshot (every served model is `loading` until the engines exist)."""
    statuses = pool.status() if pool is not None else {}
    models: dict[str, dict] = {}
    missing: dict[str, str] = {}
    for m in registry.served:
        name = m.spec.id
        s = statuses.get(name)
        if s is None:
            missing[name] = "not loaded yet"
            models[name] = _idle_entry(LOADING, m.spec.workers, "not loaded yet")
            continue
        if s.state != READY:
            missing[name] = s.problem or _WHY.get(s.state, s.state)
        models[name] = {"state": s.state, "available": s.available, "workers": s.processes, "alive": s.alive,
                        "busy": s.running, "queued": s.queued, "restarts": s.restarts,
                        "worker_pids": list(s.pids), "problem": s.problem}
    for name, reason in registry.skipped.items():
        models[name] = _idle_entry("not_downloaded" if name in registry.not_downloaded else "skipped",
                                    _workers(registry, name), reason)
    return models, missing


_WHY = {UNAVAILABLE: "unavailable after repeated worker crashes", RESTARTING: "no live workers",
        LOADING: "not loaded yet"}


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
