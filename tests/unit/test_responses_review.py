"""Found in review: text.format errors name OpenAI's fields, an output must answer a call, item statuses are
checked, and a store file that cannot be used is a StoreError naming it (never a bare sqlite3 error)."""

from __future__ import annotations

import sqlite3

import pytest
from pydantic import ValidationError

from server.errors import APIError, param_name
from server.protocol.responses_api import CreateResponse
from server.responses.items import normalise, replayed
from server.responses.store import ResponseStore, StoreError
from server.responses.translate import chat_request, check_request


def params_of(body: dict) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        CreateResponse.model_validate({"model": "m", "input": "hi"} | body)
    return [param_name(tuple(e["loc"])) for e in exc.value.errors()]


@pytest.mark.parametrize(("fmt", "param"), [
    ({"type": "json_schema", "name": "no spaces!", "schema": {}}, "text.format.name"),
    ({"type": "json_schema", "name": "x"}, "text.format.schema"),
    ({"type": "json_schema", "name": "x", "schema": {}, "strict": "yes"}, "text.format.strict"),
    ({"type": "json_object", "extra": 1}, "text.format.extra"),
])
def test_text_format_errors_name_the_field_as_openai(fmt, param):
    assert params_of({"text": {"format": fmt}}) == [param]


@pytest.mark.parametrize("kind", ["grammar", 3, None])
def test_an_unknown_text_format_type_is_a_400_naming_it(kind):
    with pytest.raises(APIError) as exc:
        check_request(CreateResponse.model_validate({"model": "m", "input": "hi",
                                                     "text": {"format": {"type": kind}}}))
    assert exc.value.status == 400 and exc.value.param == "text.format.type"


def test_a_function_call_output_must_answer_a_call_of_the_conversation():
    orphan = normalise([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                        {"type": "function_call_output", "call_id": "c2", "output": "x"}])
    with pytest.raises(APIError) as exc:
        chat_request(CreateResponse.model_validate({"model": "m"}), [], orphan)
    assert exc.value.param == "input[1].call_id" and "c2" in exc.value.message
    # a call made by the previous response (replayed history) is answered by this input
    history = replayed(normalise("hi"), [{"id": "fc_1", "type": "function_call", "call_id": "c9", "name": "f",
                                          "arguments": "{}", "status": "completed"}])
    chat, _ = chat_request(CreateResponse.model_validate({"model": "m", "previous_response_id": "resp_1"}), history,
                           normalise([{"type": "function_call_output", "call_id": "c9", "output": "x"}]))
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool"]


@pytest.mark.parametrize("item", [
    {"type": "message", "role": "user", "content": "x", "status": "done"},
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "status": 1},
    {"type": "function_call_output", "call_id": "c", "output": "x", "status": "ok"},
])
def test_an_item_status_is_one_of_openais(item):
    with pytest.raises(APIError) as exc:
        normalise([item])
    assert exc.value.param == "input[0].status"
    normalise([item | {"status": "completed"}])


def test_a_file_that_is_not_a_database_is_a_store_error_naming_it(tmp_path):
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"garbage " * 1000)
    store = ResponseStore(path, 10, 30)
    for call in (store.check, lambda: store.get("resp_a"), lambda: store.put({"id": "resp_a"}, []),
                 lambda: store.delete("resp_a"), store.count):
        with pytest.raises(StoreError, match="file is not a database") as exc:
            call()
        assert str(path) in str(exc.value)
    path.unlink()  # fixed: the next call opens a new file
    store.put({"id": "resp_a"}, [])
    assert store.get("resp_a").response == {"id": "resp_a"}


def test_a_file_without_the_table_is_a_store_error(tmp_path):
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE responses (id TEXT)")
    with pytest.raises(StoreError, match="no such column"):
        ResponseStore(path, 10, 30).check()


def test_a_locked_file_fails_the_write_then_works_again(tmp_path, monkeypatch):
    monkeypatch.setattr("server.responses.store.BUSY_TIMEOUT", 0.1)
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path, 10, 30)
    store.put({"id": "resp_a"}, [])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        store.put({"id": "resp_b"}, [])
    assert store.get("resp_a") is not None  # WAL: reads go on
    other.execute("ROLLBACK")
    other.close()
    store.put({"id": "resp_b"}, [])
    assert store.count() == 2
