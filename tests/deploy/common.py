"""Helpers shared by the deployment-file tests: parsed Dockerfile, compose file and manifests."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import yaml

from server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SETTING_VARS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
# Stopping takes the shutdown grace for in-flight requests, then up to ~7 s for the workers to exit
# (pool.stop: 5 s grace, 1 s after terminate, 1 s after kill); every stop timeout must cover it.
WORKER_EXIT_MARGIN = 15


# ---- helpers ---------------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuations joined, comments dropped."""
    out, buf = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions split per stage (ARGs before the first FROM dropped)."""
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def global_args() -> dict[str, str]:
    out = {}
    for instr, args in dockerfile():
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            out[k] = v
    return out


def base_image(stage: list[tuple[str, str]]) -> str:
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args()[m.group(1)], image)


def image_env() -> dict[str, str]:
    """The final stage's ENV."""
    env: dict[str, str] = {}
    for instr, args in stages()[-1]:
        if instr == "ENV":
            for tok in shlex.split(args):
                k, v = tok.split("=", 1)
                env[k] = v
    return env


def final(instr: str) -> list[str]:
    return [a for i, a in stages()[-1] if i == instr]


def seconds(duration: str | int) -> float:
    """A compose duration ('45s', '1m30s', '300ms') in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def k8s(kind: str) -> dict:
    found = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
