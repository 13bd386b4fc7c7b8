"""Running the HTTP server: uvicorn configured for a hostile network, signals, startup checks."""

from __future__ import annotations

import logging
import sys

from server.settings import Settings


def run(settings: Settings) -> int:
    """Serve until stopped; the process exit code."""
    import uvicorn

    from backends.registry import RegistryError
    from server.app import create_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False,  # our own access log line carries the request id, model and tokens
                timeout_graceful_shutdown=settings.shutdown_grace + 1)
    return 0
