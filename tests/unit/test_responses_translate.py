"""A Responses request as a chat request: items normalised, function calls joined, error parameters renamed."""

from __future__ import annotations

import pytest

from server.errors import APIError, bad_request
from server.protocol.responses_api import CreateResponse
from server.responses.items import normalise, replayed
from server.responses.translate import chat_request, check_request, renamed


def req(**body) -> CreateResponse:
    return CreateResponse.model_validate({"model": "m", "input": "hi"} | body)


def test_a_string_input_is_one_user_message_after_the_instructions():
    chat, _ = chat_request(req(instructions="Be brief."), [], normalise("hi"))
    assert [(m.role, m.content if isinstance(m.content, str) else [p.text for p in m.content])
            for m in chat.messages] == [("system", "Be brief."), ("user", ["hi"])]


def test_calls_join_one_assistant_message_and_outputs_are_tool_messages():
    items = normalise([
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
    ])
    chat, params = chat_request(req(), [], items)
    roles = [m.role for m in chat.messages]
    assert roles == ["user", "assistant", "tool", "tool"]
    assert [c.id for c in chat.messages[1].tool_calls] == ["c1", "c2"]
    assert [m.content for m in chat.messages[2:]] == ["one", "two"]
    assert params.rename("messages[1].tool_calls[1].function.arguments") == "input[2].arguments"
    assert params.rename("messages[2].content") == "input[3].output"
    assert params.rename("messages[0].content") == "input[0].content"


def test_a_chain_replays_history_before_the_input():
    first = normalise("hello")
    output = [{"id": "msg_1", "type": "message", "content": [{"type": "output_text", "text": "hi there"}]},
              {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}",
               "status": "completed"}]
    history = replayed(first, output)
    chat, params = chat_request(req(previous_response_id="resp_1"), history, normalise("more"))
    assert [m.role for m in chat.messages] == ["user", "assistant", "user"]
    assert chat.messages[1].tool_calls[0].id == "c1"
    assert params.rename("messages[1].content") == "previous_response_id.content"
    assert params.rename("messages[2].content") == "input[0].content"


@pytest.mark.parametrize(("chat_param", "param"), [
    ("max_completion_tokens", "max_output_tokens"), ("response_format.json_schema.schema", "text.format.schema"),
    ("tools[3].function.parameters", "tools[3].parameters"), ("messages", "input"), ("tool_choice", "tool_choice"),
])
def test_chat_errors_name_the_responses_field(chat_param, param):
    _, params = chat_request(req(), [], normalise("hi"))
    exc = renamed(bad_request(f"{chat_param} is wrong.", chat_param), params)
    assert exc.param == param and exc.message == f"{param} is wrong."


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"content": "x"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
])
def test_bad_items_name_their_field(body, param):
    with pytest.raises(APIError) as exc:
        normalise(req(**body).input)
    assert exc.value.status == 400 and exc.value.param == param


def test_input_is_required_unless_chained():
    with pytest.raises(APIError) as exc:
        check_request(CreateResponse.model_validate({"model": "m"}))
    assert exc.value.param == "input"
    check_request(CreateResponse.model_validate({"model": "m", "previous_response_id": "resp_1"}))
