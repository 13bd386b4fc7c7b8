"""Hand-written bad input over raw HTTP: every case is a 4xx in OpenAI's error shape, never a 5xx or a
hang, and the server answers a normal request afterwards.

OpenAI answers invalid requests with 400 `invalid_request_error` (also for wrong JSON types: it does not
coerce "4" to 4 or true to 1), 404 for unknown models and URLs, 405 for a wrong method; an over-large
body may also be a 413. Where the field at fault is clear, the error's `param` must name it (or a part
of it, e.g. `messages[0].role` for `messages`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

from tests.schemas import validate

COMP, CHAT = "/completions", "/chat/completions"
USER = [{"role": "user", "content": "hi"}]
DROP = object()  # remove the key from the base body
JSON_CT = {"content-type": "application/json"}
TIMEOUT = 60  # a 2 MB prompt is tokenized in a few seconds; a hang fails the case


def comp(**fields) -> dict:
    return _with({"model": "succ", "prompt": "x", "max_tokens": 4}, fields)


def chat(**fields) -> dict:
    return _with({"model": "succ", "messages": USER, "max_tokens": 4}, fields)


def _with(base: dict, fields: dict) -> dict:
    out = {**base, **fields}
    return {k: v for k, v in out.items() if v is not DROP}


@dataclass
class Case:
    id: str
    path: str
    json: object = DROP  # a JSON body (sent with application/json)
    raw: bytes | None = None  # or raw bytes
    headers: dict = field(default_factory=lambda: dict(JSON_CT))
    method: str = "POST"
    status: tuple[int, ...] = (400,)
    param: str | None = None  # the field the error must blame
    code: str | None = None  # the error code it must carry

    def param_id(self):
        return pytest.param(self, id=f"{self.method} {self.path} {self.id}")


def raw_case(id: str, raw: bytes, param: str | None = None, code: str | None = None,
             paths=(COMP, CHAT), **kw) -> list[Case]:
    return [Case(id, p, raw=raw, param=param, code=code, **kw) for p in paths]


def _comp_raw(fragment: bytes) -> bytes:
    return b'{"model": "succ", "prompt": "x", ' + fragment + b"}"


def _chat_raw(fragment: bytes) -> bytes:
    return b'{"model": "succ", "messages": [{"role": "user", "content": "hi"}], ' + fragment + b"}"


def both_raw(id: str, fragment: bytes, param: str | None = None) -> list[Case]:
    """The same extra JSON member added to a valid body of each endpoint."""
    return [Case(id, COMP, raw=_comp_raw(fragment), param=param),
            Case(id, CHAT, raw=_chat_raw(fragment), param=param)]


DEEP = 100_000

# ---- bodies that are not a JSON object ----
NOT_JSON = [
    *raw_case("malformed-truncated", b'{"model": "succ", "prompt": "x"', code="invalid_json"),
    *raw_case("malformed-garbage", b"{not json}", code="invalid_json"),
    *raw_case("malformed-trailing-comma", b'{"model": "succ", "prompt": "x",}', code="invalid_json"),
    *raw_case("malformed-single-quotes", b"{'model': 'succ', 'prompt': 'x'}", code="invalid_json"),
    *raw_case("malformed-trailing-data", b'{"model": "succ", "prompt": "x"} {"x": 1}', code="invalid_json"),
    *raw_case("empty-body", b""),
    *raw_case("whitespace-body", b"  \n "),
    *raw_case("json-list-empty", b"[]"),
    *raw_case("json-list-of-object", b'[{"model": "succ", "prompt": "x", "max_tokens": 4}]'),
    *raw_case("json-string", b'"hello"'),
    *raw_case("json-null", b"null"),
    *raw_case("json-number", b"42"),
    *raw_case("json-true", b"true"),
    *raw_case("invalid-utf8-in-string", b'{"model": "succ", "prompt": "\xff\xfe\xfd", "max_tokens": 4}'),
    *raw_case("invalid-utf8-in-key", b'{"model\xc0\xaf": "succ", "prompt": "x"}'),
    *raw_case("invalid-utf8-truncated-sequence",
              b'{"model": "succ", "messages": [{"role": "user", "content": "\xe6\x97"}]}'),
    *raw_case("latin1-body", '{"model": "succ", "prompt": "café"}'.encode("latin-1"),
              headers={"content-type": "application/json; charset=latin-1"}),
    *raw_case("deep-nesting-top-level", b"[" * DEEP + b"]" * DEEP),
    *raw_case("deep-nesting-objects", b'{"a":' * DEEP + b"1" + b"}" * DEEP),
    Case("deep-nesting-in-prompt", COMP, raw=b'{"model": "succ", "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    Case("deep-nesting-in-content", CHAT,
         raw=b'{"model": "succ", "messages": [{"role": "user", "content": ' + b"[" * DEEP + b"]" * DEEP
             + b"}]}"),
]

# ---- JSON escapes that decode to strings UTF-8 cannot encode ----
LONE_SURROGATES = [
    Case("lone-surrogate-prompt", COMP, raw=b'{"model": "succ", "prompt": "a\\ud800b", "max_tokens": 4}',
         param="prompt"),
    Case("lone-surrogate-prompt-list", COMP, raw=b'{"model": "succ", "prompt": ["x", "\\udfff"]}',
         param="prompt"),
    Case("lone-surrogate-content", CHAT,
         raw=b'{"model": "succ", "messages": [{"role": "user", "content": "\\ud83d"}], "max_tokens": 4}',
         param="messages"),
]

# ---- numbers JSON allows but no field does ----
NUMBERS = [
    *both_raw("max_tokens=1e400", b'"max_tokens": 1e400', "max_tokens"),
    *both_raw("temperature=1e400", b'"temperature": 1e400', "temperature"),
    *both_raw("seed=1e400", b'"seed": 1e400', "seed"),
    *both_raw("n=-1e400", b'"n": -1e400', "n"),
    *both_raw("logit_bias-value=1e400", b'"logit_bias": {"1": 1e400}', "logit_bias"),
    *both_raw("max_tokens=5000-digit-int", b'"max_tokens": ' + b"9" * 5000),
    *both_raw("max_tokens=10**400", b'"max_tokens": 1' + b"0" * 400, "max_tokens"),
    *both_raw("temperature=NaN", b'"temperature": NaN', "temperature"),
    *both_raw("top_p=Infinity", b'"top_p": Infinity', "top_p"),
    *both_raw("presence_penalty=-Infinity", b'"presence_penalty": -Infinity', "presence_penalty"),
    *both_raw("frequency_penalty=NaN", b'"frequency_penalty": NaN', "frequency_penalty"),
    *both_raw("seed=NaN", b'"seed": NaN', "seed"),
    *both_raw("n=Infinity", b'"n": Infinity', "n"),
    *both_raw("logit_bias-value=NaN", b'"logit_bias": {"1": NaN}', "logit_bias"),
    Case("max_tokens=NaN", COMP, raw=b'{"model": "succ", "prompt": "x", "max_tokens": NaN}', param="max_tokens"),
    Case("max_completion_tokens=Infinity", CHAT, raw=_chat_raw(b'"max_completion_tokens": Infinity'),
         param="max_completion_tokens"),
]

# ---- wrong JSON types for every main field ----
# Each list has values of the wrong type; "coercible" ones (a number in a string, a bool for a
# number, a number for a bool) are what a lax parser silently converts and OpenAI rejects.
COMMON_WRONG = {
    "model": [5, None, True, ["succ"], {"id": "succ"}],
    "max_tokens": ["many", [], {}, 4.5, "4", True],
    "temperature": ["hot", [], {}, "0.5", True],
    "top_p": ["x", [0.5], "0.5"],
    "n": ["two", 1.5, [], "1", True],
    "stream": ["yes", 2, [], {}, "false", 0],
    "stop": [5, True, {"a": 1}, ["a", 1], ["a", None], [["a"]]],
    "logit_bias": [[], "x", 5, {"1": "x"}, {"1": None}, {"1": [1]}, {"1": 1.5}],
    "seed": ["x", 1.5, [], "1"],
    "user": [5, ["u"], {}, True],
    "frequency_penalty": ["x", [], "0"],
    "presence_penalty": ["x", {}, "0"],
    "stream_options": ["yes", 1, [], {"include_usage": "maybe"}, {"include_usage": []}],
    "top_k": ["x", 1.5, "5"],
    "repetition_penalty": ["x", [], "1.1"],
}
COMPLETION_WRONG = {
    "prompt": [5, True, 1.5, {"text": "x"}],
    "echo": ["yes", [], 2, "false", 0],
    "logprobs": ["x", [], 1.5, "1", True],
    "best_of": ["x", [], "1"],
    "suffix": [5, [], {}],
}
CHAT_WRONG = {
    "messages": ["hi", 5, None, {"role": "user", "content": "hi"}, ["hi"], [None], [5], [[USER[0]]]],
    "max_completion_tokens": ["x", [], 4.5, "4", True],
    "logprobs": ["yes", [], 2, "true", 1],
    "top_logprobs": ["x", [], 1.5, "2"],
    "response_format": ["text", 5, []],
    "tools": ["x", {}, 5],
    "metadata": ["x", [], {"k": 5}],
    "safety_identifier": [5, [], {}],
}


def _wrong_type_cases() -> list[Case]:
    cases = []
    for table, paths in ((COMMON_WRONG, (COMP, CHAT)), (COMPLETION_WRONG, (COMP,)), (CHAT_WRONG, (CHAT,))):
        for name, values in table.items():
            for value in values:
                for path in paths:
                    base = comp if path == COMP else chat
                    extra = {"stream": True} if name == "stream_options" else {}
                    cases.append(Case(f"{name}={json.dumps(value)}", path, json=base(**{**extra, name: value}),
                                      param=name))
    return cases


# ---- values of the right type outside their range ----
RANGES = [
    *[Case(f"{k}={v}", p, json=(comp if p == COMP else chat)(**{k: v}), param=k)
      for p in (COMP, CHAT)
      for k, v in [("max_tokens", -1), ("n", 0), ("n", -1), ("n", 129), ("n", 9), ("temperature", -1),
                   ("temperature", 2.5), ("top_p", -0.5), ("top_p", 1.5), ("frequency_penalty", -2.5),
                   ("presence_penalty", 2.01), ("top_k", -1), ("repetition_penalty", 0),
                   ("repetition_penalty", -1), ("repetition_penalty", 11)]],
    Case("logprobs=-1", COMP, json=comp(logprobs=-1), param="logprobs"),
    Case("logprobs=6", COMP, json=comp(logprobs=6), param="logprobs"),
    Case("best_of=-1", COMP, json=comp(best_of=-1), param="best_of"),
    Case("top_logprobs=-1", CHAT, json=chat(logprobs=True, top_logprobs=-1), param="top_logprobs"),
    Case("top_logprobs=21", CHAT, json=chat(logprobs=True, top_logprobs=21), param="top_logprobs"),
    Case("max_completion_tokens=-1", CHAT, json=chat(max_completion_tokens=-1), param="max_completion_tokens"),
    Case("max_tokens=10**12", COMP, json=comp(max_tokens=10**12), param="max_tokens",
         code="context_length_exceeded"),
    Case("max_tokens=10**12", CHAT, json=chat(max_tokens=10**12), param="max_tokens",
         code="context_length_exceeded"),
    Case("max_completion_tokens=10**12", CHAT, json=chat(max_completion_tokens=10**12),
         param="max_completion_tokens", code="context_length_exceeded"),
    Case("max_tokens=2**63", COMP, json=comp(max_tokens=2**63), param="max_tokens"),
    Case("max_tokens=2**64+1", CHAT, json=chat(max_tokens=2**64 + 1), param="max_tokens"),
    Case("safety_identifier-too-long", CHAT, json=chat(safety_identifier="s" * 65), param="safety_identifier"),
]

# ---- stop sequences ----
STOPS = [
    *[Case(id, p, json=(comp if p == COMP else chat)(stop=v), param="stop")
      for p in (COMP, CHAT)
      for id, v in [("5-stop-strings", ["a", "b", "c", "d", "e"]), ("stop-ints", [1, 2]),
                    ("stop-null-item", ["a", None]), ("stop-nested-list", [["a"]]),
                    ("stop-object-item", [{"s": "a"}]), ("stop-100-strings", ["s"] * 100)]],
]

# ---- logit_bias keys and values ----
LOGIT_BIAS = [
    *[Case(f"logit_bias={json.dumps(v, ensure_ascii=False)}", p,
           json=(comp if p == COMP else chat)(logit_bias=v), param="logit_bias")
      for p in (COMP, CHAT)
      for v in [{"abc": 1}, {"-1": 1}, {"1.5": 1}, {" 1": 1}, {"": 1}, {"0x10": 1}, {"1e3": 1},
                {"²": 1}, {"١": 1}, {"99999": 1}, {"1" * 400: 1}, {"1": 101}, {"1": -101},
                {"1": 10**30}]],
]

# ---- prompt shapes ----
PROMPTS = [
    Case(f"prompt={json.dumps(v)}", COMP, json=comp(prompt=v), param="prompt")
    for v in [["a", 1], [1, "a"], [[1], "a"], ["a", [1]], [1, [2]], [None], ["a", None], [[1, "a"]],
              [[1], [None]], [1.5], [True], [1, True], [[True]], [{"a": 1}], [], [[]], [[1], []], [-1],
              [10**9], [[2**64]], [["a"]]]
]

# ---- messages ----
MESSAGES = [
    Case("messages=[]", CHAT, json=chat(messages=[]), param="messages"),
    Case("messages-missing", CHAT, json=chat(messages=DROP), param="messages"),
    Case("content=[]", CHAT, json=chat(messages=[{"role": "user", "content": []}]), param="messages"),
    Case("user-content-null", CHAT, json=chat(messages=[{"role": "user", "content": None}]), param="messages"),
    Case("user-content-missing", CHAT, json=chat(messages=[{"role": "user"}]), param="messages"),
    *[Case(f"role={json.dumps(r)}", CHAT, json=chat(messages=[{"role": r, "content": "hi"}]), param="messages")
      for r in ["wizard", "", "USER", "User", " user", None, 5, ["user"]]],
    Case("role-missing", CHAT, json=chat(messages=[{"content": "hi"}]), param="messages"),
    Case("message-unknown-key", CHAT, json=chat(messages=[{"role": "user", "content": "hi", "mood": "x"}]),
         param="messages"),
    Case("content-part-not-text", CHAT,
         json=chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         param="messages"),
    Case("content-part-text-not-string", CHAT,
         json=chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), param="messages"),
    Case("content-part-missing-type", CHAT,
         json=chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]), param="messages"),
    Case("content-part-int", CHAT, json=chat(messages=[{"role": "user", "content": [5]}]), param="messages"),
    Case("content-object", CHAT, json=chat(messages=[{"role": "user", "content": {"text": "hi"}}]),
         param="messages"),
    Case("one-good-one-bad-message", CHAT,
         json=chat(messages=[USER[0], {"role": "user", "content": 5}]), param="messages"),
]

# ---- nested garbage ----
GARBAGE = {"a": [1, {"b": [None, {"c": [[[]]]}], "d": "e"}], "f": {"g": {"h": [True, 1.5, "x"]}}}
NESTED = [
    Case("prompt=nested-garbage", COMP, json=comp(prompt=GARBAGE), param="prompt"),
    Case("model=nested-garbage", COMP, json=comp(model=GARBAGE), param="model"),
    Case("content=nested-garbage", CHAT, json=chat(messages=[{"role": "user", "content": GARBAGE}]),
         param="messages"),
    Case("messages=nested-garbage", CHAT, json=chat(messages=GARBAGE), param="messages"),
    Case("logit_bias=nested-garbage", CHAT, json=chat(logit_bias=GARBAGE), param="logit_bias"),
    Case("stream_options=nested-garbage", COMP, json=comp(stream=True, stream_options=GARBAGE),
         param="stream_options"),
    Case("unknown-field-nested-garbage", COMP, json=comp(garbage=GARBAGE), param="garbage"),
    Case("unknown-field-nested-garbage", CHAT, json=chat(garbage=GARBAGE), param="garbage"),
    Case("only-garbage", COMP, json=GARBAGE),
    Case("only-garbage", CHAT, json=GARBAGE),
    Case("empty-object", COMP, json={}, param="model"),
    Case("empty-object", CHAT, json={}, param="model"),
]

# ---- size ----
TWO_MB = 2 * 1024 * 1024
HUGE = [
    Case("prompt-2MB-string", COMP, json=comp(prompt="a" * TWO_MB), status=(400, 413)),
    Case("prompt-2MB-words", COMP, json=comp(prompt="hello world " * (TWO_MB // 12)), status=(400, 413)),
    Case("prompt-list-of-2MB-strings", COMP, json=comp(prompt=["x", "b" * TWO_MB]), status=(400, 413)),
    Case("prompt-500k-token-ids", COMP, json=comp(prompt=[1] * 500_000), status=(400, 413)),
    Case("content-2MB", CHAT, json=chat(messages=[{"role": "user", "content": "a" * TWO_MB}]), status=(400, 413)),
    Case("content-2MB-multibyte", CHAT, json=chat(messages=[{"role": "user", "content": "日" * (TWO_MB // 3)}]),
         status=(400, 413)),
    Case("2000-messages", CHAT, json=chat(messages=[{"role": "user", "content": "hello there"}] * 2000),
         status=(400, 413)),
    Case("model-2MB", COMP, json=comp(model="m" * TWO_MB), status=(400, 404, 413)),
    Case("stream-prompt-2MB", COMP, json=comp(prompt="a" * TWO_MB, stream=True), status=(400, 413)),
    Case("stream-content-2MB", CHAT, json=chat(messages=[{"role": "user", "content": "a" * TWO_MB}], stream=True),
         status=(400, 413)),
]

# ---- content types ----
BODY = json.dumps(comp()).encode()
CONTENT_TYPES = [
    Case(f"content-type={ct}", path, raw=body, headers={"content-type": ct}, status=(400, 415))
    for path, body in ((COMP, BODY), (CHAT, json.dumps(chat()).encode()))
    for ct in ["text/plain", "application/x-www-form-urlencoded", "application/xml", "application/octet-stream",
               "multipart/form-data; boundary=xyz", "text/html; charset=utf-8"]
] + [
    Case("form-encoded-body", COMP, raw=b"model=succ&prompt=x&max_tokens=4",
         headers={"content-type": "application/x-www-form-urlencoded"}, status=(400, 415)),
    Case("multipart-body", CHAT,
         raw=b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nsucc\r\n--xyz--\r\n',
         headers={"content-type": "multipart/form-data; boundary=xyz"}, status=(400, 415)),
]

# ---- methods and URLs ----
METHODS = [
    *[Case(f"{m}-on-post-route", p, method=m, headers={}, status=(405,))
      for p in (COMP, CHAT) for m in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH")],
    *[Case(f"{m}-on-get-route", p, method=m, headers={}, status=(405,))
      for p in ("/models", "/models/succ") for m in ("POST", "PUT", "DELETE", "PATCH")],
    Case("GET-with-json-body-on-post-route", COMP, method="GET", json=comp(), status=(405,)),
    Case("unknown-url", "/engines/succ/completions", json=comp(), status=(404,)),
    Case("unknown-url", "/completions/extra", json=comp(), status=(404,)),
    Case("unknown-model", COMP, json=comp(model="no-such-model"), status=(404,), param="model",
         code="model_not_found"),
    Case("unserved-model", CHAT, json=chat(model="absent"), status=(404,), param="model",
         code="model_not_found"),
    Case("unknown-model", "/models/no-such-model", method="GET", headers={}, status=(404,),
         code="model_not_found"),
]

ALL = (NOT_JSON + LONE_SURROGATES + NUMBERS + _wrong_type_cases() + RANGES + STOPS + LOGIT_BIAS + PROMPTS
       + MESSAGES + NESTED + HUGE + CONTENT_TYPES + METHODS)


@pytest.fixture(scope="module")
def http(server):
    """One client for the module; every request on a fresh connection, so cases cannot affect each other."""
    with httpx.Client(base_url=server.url, timeout=TIMEOUT, headers={"connection": "close"}) as c:
        yield c


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    kwargs: dict = {"headers": case.headers}
    if case.raw is not None:
        kwargs["content"] = case.raw
    elif case.json is not DROP:
        kwargs["content"] = json.dumps(case.json).encode()
        kwargs["headers"] = {**JSON_CT, **case.headers}
    return http.request(case.method, case.path, **kwargs)


def _blames(param: str | None, field: str) -> bool:
    return param is not None and (param == field or param.startswith((field + ".", field + "[")))


def assert_still_serving(http: httpx.Client) -> None:
    """A normal request (on a fresh connection) still works."""
    r = http.post(COMP, json={"model": "succ", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 200, f"the server no longer answers a normal request: {r.status_code} {r.text}"
    assert r.json()["choices"][0]["text"] == "yz"


@pytest.mark.parametrize("case", [c.param_id() for c in ALL])
def test_bad_input_is_a_4xx_in_openai_shape(http, case: Case):
    try:
        r = _send(http, case)
    except httpx.HTTPError as exc:
        pytest.fail(f"no response ({type(exc).__name__}: {exc}); the server hung or dropped the connection")
    shown = r.text[:500]
    assert r.status_code in case.status, f"expected {case.status}, got {r.status_code}: {shown}"
    if case.method == "HEAD":
        assert r.content == b""
    else:
        assert r.headers.get("content-type", "").startswith("application/json"), r.headers
        body = r.json()
        validate("error", body)
        error = body["error"]
        assert error["type"] == "invalid_request_error", shown
        if case.param is not None:
            assert _blames(error["param"], case.param), f"param {error['param']!r} does not name {case.param!r}"
        if case.code is not None:
            assert error["code"] == case.code, shown
    if case.status == (405,):
        assert r.headers.get("allow"), "a 405 names the allowed methods"
    assert_still_serving(http)


@pytest.mark.parametrize("content", ["", [{"type": "text", "text": ""}]], ids=["string", "text-part"])
@pytest.mark.parametrize("model", ["succ", "succ-tmpl"])
def test_empty_message_content_is_no_server_error(http, content, model):
    """OpenAI accepts an empty user message; here it may be answered or refused, never a 5xx."""
    r = http.post(CHAT, json=chat(model=model, messages=[{"role": "user", "content": content}]))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        validate("error", r.json())
    else:
        validate("chat_completion", r.json())
    assert_still_serving(http)


@pytest.mark.parametrize("fragment", [b'"stop": ["\\udc00"]', b'"user": "\\ud800"'], ids=["stop", "user"])
@pytest.mark.parametrize("path", [COMP, CHAT])
def test_lone_surrogate_in_text_that_is_not_tokenized_is_no_server_error(http, path, fragment):
    """A lone surrogate where no text is encoded may be accepted or refused, never a 5xx."""
    raw = _comp_raw(fragment) if path == COMP else _chat_raw(fragment)
    r = http.post(path, content=raw, headers=JSON_CT)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        validate("error", r.json())
    assert_still_serving(http)


def test_many_bad_requests_in_a_row_leave_the_server_healthy(server, http):
    """The whole battery on one keep-alive connection, then normal service and a ready pool."""
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        for case in ALL:
            if case.raw is None and case.json is not DROP and len(json.dumps(case.json)) > 100_000:
                continue  # the huge ones are covered above
            try:
                kwargs = {"content": case.raw} if case.raw is not None else (
                    {"json": case.json} if case.json is not DROP else {})
                r = c.request(case.method, case.path, headers=case.headers, **kwargs)
            except httpx.HTTPError as exc:
                pytest.fail(f"{case.method} {case.path} {case.id}: no response ({type(exc).__name__}: {exc})")
            assert r.status_code < 500, f"{case.method} {case.path} {case.id}: {r.status_code} {r.text[:300]}"
    assert_still_serving(http)
    ready = httpx.get(server.base + "/ready", timeout=10)
    assert ready.status_code == 200, ready.text


def test_huge_prompt_does_not_stall_other_requests(server):
    """While a 2 MB prompt is being rejected, the server keeps answering others (no event-loop stall)."""
    import threading
    import time

    done: list[httpx.Response] = []
    big = threading.Thread(target=lambda: done.append(httpx.post(
        server.url + COMP, json=comp(prompt="a" * TWO_MB), timeout=TIMEOUT)))
    big.start()
    try:
        time.sleep(0.3)  # the 2 MB body is uploaded and being processed
        started = time.monotonic()
        r = httpx.get(server.base + "/health", timeout=TIMEOUT)
        waited = time.monotonic() - started
    finally:
        big.join()
    assert r.status_code == 200
    assert done and done[0].status_code in (400, 413), done and done[0].text[:300]
    assert waited < 1.0, f"/health took {waited:.2f}s while a 2 MB prompt was processed"


def _wait_idle(server, model: str) -> None:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = httpx.get(server.base + "/ready", timeout=10).json()["models"][model]
        if state["alive"] and not state["busy"] and not state["queued"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{model} did not become idle")


@pytest.mark.parametrize("model,path,body,allowed", [
    # --max-prompts default 16, --max-n default 8; succ: 1 worker + max_queue 8, slow: 1 worker + max_queue 1
    ("succ", COMP, {"prompt": ["a"] * 16, "max_tokens": 1}, (200, 400)),
    ("succ", COMP, {"prompt": ["a"] * 2, "n": 8, "max_tokens": 1}, (200, 400)),
    ("slow", COMP, {"prompt": "a", "n": 3, "max_tokens": 1}, (200, 400)),
    ("slow", CHAT, {"messages": USER, "n": 8, "max_tokens": 1}, (200, 400)),
    ("succ", COMP, {"prompt": ["a"] * 9, "max_tokens": 1}, (200,)),  # exactly workers + max_queue: fits
    ("slow", COMP, {"prompt": "a", "n": 2, "max_tokens": 1}, (200,)),  # exactly workers + max_queue: fits
], ids=["succ-16-prompts", "succ-2-prompts-n8", "slow-n3", "slow-chat-n8", "succ-9-prompts", "slow-n2"])
def test_one_request_on_an_idle_server_is_never_queue_full(server, model, path, body, allowed):
    """A single request within the documented limits (max_n, max_prompts) on an idle model is served, or
    refused with a 400 that says why; a 503 'retry shortly' can never succeed on retry."""
    _wait_idle(server, model)
    r = httpx.post(server.url + path, json={"model": model, **body}, timeout=TIMEOUT)
    assert r.status_code in allowed, f"{r.status_code} {r.headers.get('retry-after')} {r.text[:300]}"
    if r.status_code == 400:
        validate("error", r.json())
