"""Container health check for gpt4all-j-server: exit 0 when GET <path> answers 200, else 1.

Slim images have no curl, so the image's HEALTHCHECK (and compose's) run this with the image's Python.
Usage: python /app/healthcheck.py [/health | /ready]

It reads the server's own settings from the environment: the port (GPT4ALL_J_PORT, default 4891) and,
when GPT4ALL_J_AUTH_HEALTH is on, the first key of GPT4ALL_J_API_KEYS or GPT4ALL_J_API_KEY_FILE.
Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TRUE = {"1", "true", "yes", "on", "y", "t"}


def first_key(env: dict[str, str]) -> str | None:
    """The first API key the server accepts, if any."""
    keys = [k.strip() for k in env.get("GPT4ALL_J_API_KEYS", "").split(",") if k.strip()]
    if not keys and env.get("GPT4ALL_J_API_KEY_FILE"):
        with open(env["GPT4ALL_J_API_KEY_FILE"], encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return keys[0] if keys else None


def check(path: str = "/health", env: dict[str, str] | None = None, timeout: float = 4.0) -> bool:
    """True when the local server answers `path` with 200."""
    env = dict(os.environ) if env is None else env
    url = f"http://127.0.0.1:{env.get('GPT4ALL_J_PORT', '4891')}{path}"
    req = urllib.request.Request(url)
    if env.get("GPT4ALL_J_AUTH_HEALTH", "").strip().lower() in TRUE:
        key = first_key(env)
        if key:
            req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (fixed local URL)
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/health"
    if path not in ("/health", "/ready"):
        print(f"usage: {argv[0]} [/health | /ready]", file=sys.stderr)
        return 2
    return 0 if check(path) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
