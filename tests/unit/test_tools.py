"""Tool calling's pure logic: grammars, the reply split (streamed and whole), templates and request plans."""

import json
from types import SimpleNamespace

import jsonschema
import pytest

from backends.grammar import Matcher, vocab_for
from backends.registry import ModelSpec, ServedModel
from backends.templates import BUILTIN_TEMPLATES
from backends.tokenizer import Tokenizer
from server.errors import APIError
from server.params import chat_plan
from server.protocol import ChatCompletionRequest
from server.settings import Settings
from server.tools import CallSplitter, calls_grammar, calls_schema, split_reply

PIECES = [bytes([b]) for b in range(256)] + [b"<|endoftext|>"]  # one token per byte, then EOS
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast.", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping"}}]


def model(template: str = "plain") -> ServedModel:
    info = SimpleNamespace(n_vocab=len(PIECES), n_ctx=2048, eos_token_id=256)
    return ServedModel(ModelSpec(id="m", path="m.bin"), None, info, BUILTIN_TEMPLATES[template], Tokenizer(PIECES))


def accepts(constraint, text: str) -> bool:
    """Whether the grammar lets a byte-per-token model write exactly this text and then stop."""
    m = Matcher(constraint, vocab_for(PIECES, 256))
    for byte in text.encode():
        if not m.allowed()[byte]:
            return False
        m.accept(byte)
    return bool(m.allowed()[256])


def plan(**body):
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **body)
    return chat_plan(req, model(), Settings())


def test_required_grammar_is_the_marker_and_calls_of_the_allowed_tools():
    tools = [{"name": "weather", "parameters": WEATHER}, {"name": "ping", "parameters": None}]
    g = calls_grammar("<tool_call>", calls_schema(tools, 2), free_text=False)
    assert accepts(g, '<tool_call>[{"name":"weather","arguments":{"city":"Oslo","days":3}}]')
    assert accepts(g, '<tool_call>[{"name":"ping","arguments":{}},{"name":"ping","arguments":{"x":1}}]')
    assert not accepts(g, "hello")
    assert not accepts(g, '<tool_call>[{"name":"weather","arguments":{"city":"Rome","days":3}}]')
    assert not accepts(g, '<tool_call>[{"name":"weather","arguments":{"city":"Oslo","days":9}}]')
    assert not accepts(g, '<tool_call>[{"name":"other","arguments":{}}]')
    assert not accepts(g, '<tool_call>[' + ','.join(['{"name":"ping","arguments":{}}'] * 3) + ']')


def test_auto_grammar_allows_text_or_a_call_but_not_a_broken_call():
    g = calls_grammar("<tool_call>", calls_schema([{"name": "ping", "parameters": None}], 1), free_text=True)
    assert accepts(g, "just words") and accepts(g, "<b>bold</b>") and accepts(g, "")
    assert accepts(g, '<tool_call>[{"name":"ping","arguments":{}}]')
    assert not accepts(g, "<tool_call>not json")


def test_defs_of_a_tool_move_to_the_root_so_references_resolve():
    params = {"type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"],
              "$defs": {"P": {"type": "integer", "minimum": 0, "maximum": 3}}}
    schema = calls_schema([{"name": "f", "parameters": params}], 1)
    jsonschema.validate([{"name": "f", "arguments": {"p": 2}}], schema)
    g = calls_grammar("<tool_call>", schema, free_text=False)
    assert accepts(g, '<tool_call>[{"name":"f","arguments":{"p":2}}]')
    assert not accepts(g, '<tool_call>[{"name":"f","arguments":{"p":5}}]')


@pytest.mark.parametrize("cut", [1, 3, 11, 12, 20])
def test_streamed_split_equals_the_whole_split(cut):
    reply = '<tool_call>[{"name":"ping","arguments":{"a":[1,2]}}]'
    s = CallSplitter("<tool_call>")
    assert s.feed(reply[:cut]) == ""  # nothing is sent while it is (or could become) a call
    end = s.finish(reply[cut:])
    whole = split_reply(reply, "<tool_call>")
    assert end.text is None and whole.text is None
    assert [(c["name"], c["arguments"]) for c in end.calls] == [("ping", '{"a":[1,2]}')]
    assert [(c["name"], c["arguments"]) for c in whole.calls] == [("ping", '{"a":[1,2]}')]
    assert end.calls[0]["id"].startswith("call_")


def test_text_is_held_only_while_it_could_be_the_marker():
    s = CallSplitter("<tool_call>")
    assert s.feed("<to") == ""
    assert s.feed("p") == "<top"  # no longer the marker: released whole
    assert s.feed(" more") == " more"
    assert s.finish("!").text == "!"
    assert split_reply("hello", "<tool_call>").text == "hello"


def test_a_cut_call_is_returned_as_its_raw_text():
    s = CallSplitter("<tool_call>")
    assert s.feed('<tool_call>[{"name":"pi') == ""
    end = s.finish()
    assert end.text == '<tool_call>[{"name":"pi' and end.calls == []
    assert split_reply("<tool", "<tool_call>").text == "<tool"


def test_the_template_lists_tools_and_writes_calls_and_results():
    req = ChatCompletionRequest(model="m", tools=TOOLS, max_tokens=5, messages=[
        {"role": "system", "content": "S"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                              "arguments": '{"city": "Oslo", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    text = bytes(chat_plan(req, model("gpt4all-j"), Settings()).prompts[0]).decode()
    tools = BUILTIN_TEMPLATES["gpt4all-j"].tools_text([{"name": "weather", "description": "Forecast.",
                                                        "parameters": WEATHER},
                                                       {"name": "ping", "description": None, "parameters": None}])
    assert text == ("S\n" + tools + "\n### Prompt:\nweather?\n"
                    '### Response:\n<tool_call>[{"name":"weather","arguments":{"city":"Oslo","days":2}}]\n'
                    "### Prompt:\nResult of weather: sunny\n### Response:\n")
    assert "- weather: Forecast. Parameters: " + json.dumps(WEATHER, separators=(",", ":")) in tools
    assert "<tool_call>" in tools


def test_tool_choice_none_shows_no_tools_and_sets_no_grammar():
    p = plan(tools=TOOLS, tool_choice="none")
    assert p.tools is None and p.sampling.constraint is None and p.prompts == [list(b"hi\n")]


def test_required_named_auto_and_legacy_plans():
    assert plan(tools=TOOLS).tools.constraint is not None  # auto by default
    named = plan(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    assert '"const":"ping"' in named.tools.constraint.grammar.replace(" ", "")
    assert '"const":"weather"' not in named.tools.constraint.grammar.replace(" ", "")
    legacy = plan(functions=[TOOLS[0]["function"]], function_call={"name": "weather"})
    assert legacy.tools.legacy and legacy.sampling.constraint is legacy.tools.constraint


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"functions": [TOOLS[0]["function"]], "function_call": {"name": "nope"}}, "function_call"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "http://x/y.json"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_what_cannot_be_served_is_a_400_naming_the_parameter(body, param):
    with pytest.raises(APIError) as err:
        plan(**body)
    assert err.value.status == 400 and err.value.param == param


def test_bad_arguments_in_the_history_are_named():
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": "{oops"}}]}])
    with pytest.raises(APIError) as err:
        chat_plan(req, model(), Settings())
    assert err.value.param == "messages[0].tool_calls[0].function.arguments"


MANY_OPTIONAL = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}


def call_plan(parameters, **body):
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    return plan(tools=tools, **{"tool_choice": "required", **body})


@pytest.mark.parametrize("parameters", [
    {"type": "object", "properties": {"a": {"$ref": "#/definitions/A"}}, "required": ["a"],
     "definitions": {"A": {"type": "integer", "minimum": 0, "maximum": 3}}},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3},
                                      "b": {"$ref": "#/properties/a"}}, "required": ["a", "b"]},
])
def test_references_inside_a_tool_resolve_within_that_tool(parameters):
    g = call_plan(parameters).tools.constraint
    assert accepts(g, '<tool_call>[{"name":"f","arguments":{"a":2' + (',"b":1' if "b" in parameters["properties"]
                                                                       else "") + '}}]')
    assert not accepts(g, '<tool_call>[{"name":"f","arguments":{"a":7' + (',"b":1' if "b" in
                                                                           parameters["properties"] else "") + '}}]')


def test_a_root_reference_in_a_tool_means_the_tool_parameters_not_the_call_array():
    tree = {"type": "object", "properties": {"child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
            "required": ["child"], "additionalProperties": False}
    g = call_plan(tree).tools.constraint
    assert accepts(g, '<tool_call>[{"name":"f","arguments":{"child":{"child":null}}}]')
    assert not accepts(g, '<tool_call>[{"name":"f","arguments":{"child":[{"name":"f","arguments":{"child":null}}]}}]')


def test_two_tools_with_the_same_def_names_keep_their_own_defs():
    a = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "required": ["x"], "$defs": {"X": {"const": 1}}}
    b = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "required": ["x"], "$defs": {"X": {"const": 2}}}
    g = plan(tools=[{"type": "function", "function": {"name": "a", "parameters": a}},
                    {"type": "function", "function": {"name": "b", "parameters": b}}], tool_choice="required",
             parallel_tool_calls=False).tools.constraint
    assert accepts(g, '<tool_call>[{"name":"a","arguments":{"x":1}}]')
    assert accepts(g, '<tool_call>[{"name":"b","arguments":{"x":2}}]')
    assert not accepts(g, '<tool_call>[{"name":"a","arguments":{"x":2}}]')


def test_parameters_without_a_type_but_with_properties_are_an_object():
    g = call_plan({"properties": {"a": {"type": "integer"}}, "required": ["a"]}).tools.constraint
    assert accepts(g, '<tool_call>[{"name":"f","arguments":{"a":5}}]')
    assert not accepts(g, '<tool_call>[{"name":"f","arguments":5}]')


@pytest.mark.parametrize("parameters", [
    {"type": "string"}, {"type": "array", "items": {"type": "integer"}}, {"anyOf": [{"type": "integer"}]},
    {"type": ["object", "null"], "properties": {}}, {"$ref": "#/definitions/missing"},
])
def test_parameters_that_are_not_an_object_schema_are_a_400(parameters):
    with pytest.raises(APIError) as err:
        call_plan(parameters)
    assert err.value.status == 400 and err.value.param == "tools[0].function.parameters"


def test_parameters_failing_at_their_first_tokens_are_a_short_400():
    for choice in ("required", "auto"):
        with pytest.raises(APIError) as err:
            call_plan(MANY_OPTIONAL, tool_choice=choice)
        assert err.value.status == 400 and err.value.param == "tools[0].function.parameters"
        assert len(err.value.message) < 500 and "\n" not in err.value.message


def test_the_tools_size_limit_is_checked_before_any_schema_is_compiled(monkeypatch):
    import server.tools

    def compile_nothing(schema):
        raise AssertionError("a schema was compiled before the size check")

    monkeypatch.setattr(server.tools, "json_schema", compile_nothing)
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(4000)}}
    with pytest.raises(APIError) as err:
        call_plan(big)
    assert err.value.status == 400 and err.value.param == "tools" and "64 KiB" in err.value.message


@pytest.mark.parametrize("made", [
    {"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]},
    {"function_call": {"name": "f", "arguments": "[" * 100_000 + "]" * 100_000}},
])
def test_deeply_nested_arguments_in_the_history_are_a_400(made):
    req = ChatCompletionRequest(model="m", messages=[{"role": "assistant", **made}])
    with pytest.raises(APIError) as err:
        chat_plan(req, model(), Settings())
    key = "tool_calls[0].function" if "tool_calls" in made else "function_call"
    assert err.value.status == 400 and err.value.param == f"messages[0].{key}.arguments"


def test_history_arguments_count_in_the_work_size():
    from server.params import BIG_WORK, work_size

    args = json.dumps({"xs": list(range(10_000))})
    req = ChatCompletionRequest(model="m", messages=[
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                              "function": {"name": "f", "arguments": args}}]}])
    assert work_size(req, Settings()) > BIG_WORK
