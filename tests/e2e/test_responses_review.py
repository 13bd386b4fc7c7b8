"""Found reviewing the Responses API: the store when its SQLite file cannot be used (a corrupt file at start:
the server starts, says why, answers with store: false, and store reads are a 503 that says so; a file locked
by another process: store calls wait on their own thread, the rest of the server keeps answering), OpenAI's
query parameters of retrieve refused by name, and request fields named as in OpenAI's request."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import start_server, stop_server, wait_for
from tests.models import write_random, write_successor
from tests.schemas import validate

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    sampling: {{temperature: 0}}
    workers: 1
"""
SLOW = """
models:
  - id: slow
    path: {slow}
    prompt_template: plain
    workers: 1
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses-review")
    path = d / "registry.yaml"
    path.write_text(REGISTRY.format(succ=write_successor(d / "succ.bin")))
    return path


def _unavailable(r: httpx.Response, param: str | None = None) -> None:
    assert r.status_code == 503, r.text
    validate("error", r.json())
    error = r.json()["error"]
    assert error["code"] == "store_unavailable" and error["param"] == param, error
    return error["message"]


def test_a_corrupt_store_file_is_reported_and_never_claims_to_store(registry, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "responses.sqlite3").write_bytes(b"this is not a database, " * 400)
    srv = start_server(registry, tmp_path / "server.log", {"GPT4ALL_J_DATA_DIR": str(data)})
    try:
        assert "stored responses are unavailable" in srv.logs() and "file is not a database" in srv.logs()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            made = c.post("/responses", json={"model": "succ", "input": "hello"})
            assert made.status_code == 200 and made.json()["store"] is False, made.text  # honest: not stored
            validate("response", made.json())
            with c.stream("POST", "/responses", json={"model": "succ", "input": "hi", "stream": True}) as s:
                lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and '"type":"response.completed"' in lines[-2]
            assert '"store":false' in lines[-2].split('"output"')[1]
            assert "file is not a database" in _unavailable(c.get(f"/responses/{made.json()['id']}"))
            _unavailable(c.delete(f"/responses/{made.json()['id']}"))
            _unavailable(c.get(f"/responses/{made.json()['id']}/input_items"))
            chained = c.post("/responses", json={"model": "succ", "input": "more",
                                                 "previous_response_id": made.json()["id"]})
            _unavailable(chained, "previous_response_id")
            assert c.post("/responses", json={"model": "succ", "input": "hi", "store": False}).status_code == 200
            chat = c.post("/chat/completions", json={"model": "succ", "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 200
    finally:
        stop_server(srv)
    assert "Traceback" not in srv.logs()


def test_a_locked_store_file_does_not_hold_up_the_rest_of_the_server(registry, tmp_path):
    """Another process holds the file's write lock: store writes (here deletes) fail after a short wait (503)
    or succeed once it is released, one at a time on the store's thread, while chat requests (whose tokenizing
    of a JSON-mode request runs on the shared thread pool) are answered meanwhile."""
    data = tmp_path / "data"
    srv = start_server(registry, tmp_path / "server.log", {"GPT4ALL_J_DATA_DIR": str(data)})
    lock = None
    try:
        with httpx.Client(base_url=srv.url, timeout=90) as c:
            rid = c.post("/responses", json={"model": "succ", "input": "hello"}).json()["id"]
            lock = sqlite3.connect(data / "responses.sqlite3", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            answers: list[httpx.Response] = []
            readers = [threading.Thread(target=lambda: answers.append(httpx.delete(f"{srv.url}/responses/{rid}",
                                                                                     timeout=120)))
                       for _ in range(14)]
            for t in readers:
                t.start()
            time.sleep(1)  # let the deletes reach the server (no timing is asserted)
            # JSON mode: a plan built on the shared thread pool (6 threads here; the deletes must not hold them)
            chat = c.post("/chat/completions", timeout=30, json={  # did not hang: 14 deletes x the wait is more
                "model": "succ", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "response_format": {"type": "json_object"}})
            assert chat.status_code == 200
            assert wait_for(lambda: answers, 30)  # the first delete has given up waiting for the lock
            lock.execute("ROLLBACK")
            lock.close()
            lock = None
            for t in readers:
                t.join(120)
            assert len(answers) == 14 and {a.status_code for a in answers} <= {200, 404, 503}
            assert any(a.status_code == 503 for a in answers)
            for a in answers:
                if a.status_code == 503:
                    assert "database is locked" in _unavailable(a)
            assert [a.status_code for a in answers].count(200) <= 1
            assert c.get(f"/responses/{rid}").status_code in (200, 404)
    finally:
        if lock is not None:
            lock.close()
        stop_server(srv)


@pytest.fixture(scope="module")
def server(registry, tmp_path_factory):
    d = tmp_path_factory.mktemp("responses-review-server")
    srv = start_server(registry, d / "server.log", {"GPT4ALL_J_DATA_DIR": str(d / "data")})
    yield srv
    stop_server(srv)


@pytest.fixture()
def sdk(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def _bad(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    validate("error", r.json())
    assert r.json()["error"]["param"] == param, r.json()
    return r.json()["error"]["message"]


def test_openai_query_parameters_of_retrieve_are_refused_by_name_not_ignored(sdk):
    made = sdk.responses.create(model="succ", input="hello")
    for call, param in [(lambda: sdk.responses.retrieve(made.id, include=["message.output_text.logprobs"]), "include"),
                        (lambda: sdk.responses.retrieve(made.id, starting_after=3), "starting_after"),
                        (lambda: sdk.responses.retrieve(made.id, include_obfuscation=True), "include_obfuscation"),
                        (lambda: sdk.responses.input_items.list(made.id, include=["message.input_image.image_url"]),
                         "include")]:
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert exc.value.param == param and exc.value.code == "unsupported_parameter"
    # the neutral values are fine
    assert sdk.responses.retrieve(made.id, include=[], include_obfuscation=False).id == made.id


def test_fields_are_named_as_in_openais_request(server):
    url = server.url + "/responses"
    fmt = {"type": "json_schema", "name": "no spaces!", "schema": {"type": "object"}}
    _bad(httpx.post(url, json={"model": "succ", "input": "hi", "text": {"format": fmt}}), "text.format.name")
    message = _bad(httpx.post(url, json={"model": "succ", "input": "hi", "text": {"format": {"type": "grammar"}}}),
                   "text.format.type")
    assert "grammar" in message
    orphan = [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "call_9", "output": "4"}]
    message = _bad(httpx.post(url, json={"model": "succ", "input": orphan}), "input[1].call_id")
    assert "call_9" in message
    bad_status = [{"type": "message", "role": "user", "content": "hi", "status": "done"}]
    _bad(httpx.post(url, json={"model": "succ", "input": bad_status}), "input[0].status")


def test_a_stream_cut_by_the_shutdown_ends_with_response_failed_then_done(tmp_path):
    """SIGTERM with no grace while a long response streams: the stream still ends with its final event
    (response.failed, the shutdown's message) and data: [DONE]; the server exits 0."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(SLOW.format(slow=write_random(tmp_path / "slow.bin", n_ctx=2048, n_embd=512, n_layer=8,
                                                      seed=3)))
    srv = start_server(registry, tmp_path / "server.log", {"GPT4ALL_J_DATA_DIR": str(tmp_path / "data"),
                                                           "GPT4ALL_J_SHUTDOWN_GRACE": "0"})
    body = {"model": "slow", "input": "Once", "max_output_tokens": 1800, "stream": True}
    events, kind, deltas = [], None, 0
    try:
        with httpx.stream("POST", srv.url + "/responses", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    events.append((kind, line[len("data: "):]))
                    deltas += kind == "response.output_text.delta"
                    if deltas == 3 and kind == "response.output_text.delta":
                        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    assert events[-1][1] == "[DONE]", events[-3:]
    final_kind, final = events[-2][0], json.loads(events[-2][1])
    validate("response_stream_event", final)
    if "outcome=cut:shutdown" in srv.logs():  # (not if the reply ended by itself before the signal)
        assert final_kind == "response.failed" and final["response"]["status"] == "failed"
        assert "shutting down" in final["response"]["error"]["message"]
    else:
        assert final_kind in ("response.completed", "response.incomplete"), final_kind
    assert "Traceback" not in srv.logs()
