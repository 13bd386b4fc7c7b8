"""Security and observability of a configured server: API keys, CORS, body cap, metrics, access log."""

import httpx
import openai
import pytest

from tests.e2e.conftest import REGISTRY, start_server, stop_server
from tests.schemas import validate
from tests.models import NO_EOS

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def keyed(model_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("keyed")
    registry = d / "registry.yaml"
    registry.write_text(REGISTRY.format(**{k: str(v) for k, v in model_files.items()}))
    keyfile = d / "keys.txt"
    keyfile.write_text("# one key per line\nsk-from-file\n")
    env = {"GPT4ALL_J_API_KEYS": KEY, "GPT4ALL_J_API_KEY_FILE": str(keyfile),
           "GPT4ALL_J_CORS_ORIGINS": "https://app.example", "GPT4ALL_J_MAX_BODY_BYTES": "65536",
           "GPT4ALL_J_QUEUE_TIMEOUT": "0.3", "GPT4ALL_J_REQUEST_TIMEOUT": "1.5"}
    srv = start_server(registry, d / "server.log", extra_env=env)
    yield srv
    stop_server(srv)


ENDPOINTS = [("GET", "/v1/models"), ("GET", "/v1/models/succ"), ("POST", "/v1/completions"),
             ("POST", "/v1/chat/completions"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("GET", "/v1/nowhere")]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_every_endpoint_needs_a_key(keyed, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.request(method, keyed.base + path, headers=headers, json={})
        assert r.status_code == 401, (path, headers, r.text)
        validate("error", r.json())
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_health_ready_and_metrics_stay_open_by_default(keyed):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(keyed.base + path).status_code == 200


def test_keys_from_setting_and_file_work_with_the_sdk(keyed):
    for key in (KEY, "sk-from-file"):
        client = openai.OpenAI(base_url=keyed.url, api_key=key, max_retries=0)
        assert client.completions.create(model="succ", prompt="x").choices[0].text == "yz"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url, api_key="nope", max_retries=0).models.list()


def test_cors_allowlist(keyed):
    pre = httpx.options(keyed.base + "/v1/models", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert pre.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(keyed.base + "/v1/models", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in other.headers


def test_body_cap_is_413(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(keyed.url + "/completions", headers=auth,
                   json={"model": "succ", "prompt": "x" * 70000})
    assert r.status_code == 413
    validate("error", r.json())

    def chunks():  # no content-length: counted while reading
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(keyed.url + "/completions", headers={**auth, "content-type": "application/json"},
                   content=chunks())
    assert r.status_code == 413


def test_generation_time_limit_ends_with_length(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(keyed.url + "/completions", headers=auth, timeout=30,
                   json={"model": "slow", "prompt": "Once", "max_tokens": 1800, **NO_EOS})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert 0 < body["usage"]["completion_tokens"] < 1800
    assert "hit the generation time limit" in keyed.logs()


def test_queue_timeout_is_503_also_for_streams(keyed):
    import threading
    import time

    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "slow", "prompt": "Once", "max_tokens": 1800, **NO_EOS}
    holder = threading.Thread(target=httpx.post, args=(keyed.url + "/completions",),
                              kwargs={"headers": auth, "timeout": 30, "json": long})
    holder.start()
    time.sleep(0.2)  # the holder has the only worker for 1.5 s; the queue timeout is 0.3 s
    for stream in (False, True):
        t0 = time.monotonic()
        r = httpx.post(keyed.url + "/completions", headers=auth, timeout=30, json={**long, "stream": stream})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "queue_timeout" and int(r.headers["retry-after"]) >= 1
        validate("error", r.json())
        assert time.monotonic() - t0 < 1.2
    holder.join()


def test_request_id_is_echoed_and_logged(server, client):
    r = client.post("/completions", json={"model": "succ", "prompt": "x"}, headers={"X-Request-ID": "req-42"})
    assert r.headers["x-request-id"] == "req-42"
    generated = client.get("/models").headers["x-request-id"]
    assert len(generated) >= 16
    line = next(line for line in server.logs().splitlines() if "req-42" in line)
    for part in ('"POST /v1/completions" 200', "model=succ", "prompt_tokens=1", "completion_tokens=2",
                 "ttft_ms=", "duration_ms="):
        assert part in line, line


def test_metrics_exposition(server, client):
    client.post("/completions", json={"model": "succ", "prompt": "x"})
    client.post("/completions", json={"model": "nope", "prompt": "x"})
    text = httpx.get(server.base + "/metrics").text
    for name in (
        'gpt4all_j_requests_total{route="/v1/completions",status="200"}',
        "gpt4all_j_request_duration_seconds_bucket",
        'gpt4all_j_time_to_first_token_seconds_count{model="succ"}',
        'gpt4all_j_prompt_tokens_total{model="succ"}',
        'gpt4all_j_completion_tokens_total{model="succ"}',
        "gpt4all_j_generation_tokens_per_second_bucket",
        'gpt4all_j_queue_depth_requests{model="succ"}',
        "gpt4all_j_queue_wait_seconds_bucket",
        'gpt4all_j_workers_busy{model="succ"}',
        'gpt4all_j_workers_alive{model="succ"} 1.0',
        'gpt4all_j_worker_restarts_total{model="succ"}',
        'gpt4all_j_rejected_requests_total{reason="model_not_found"}',
    ):
        assert name in text, name
