"""The one place that maps OpenAI request fields to engine fields, and rejects what is unsupported."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backends.grammar import Constraint
from backends.registry import ServedModel
from backends.types import SamplingParams
from server.errors import APIError, bad_request, shorten, unsupported
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import Settings
from server.structured import constraint_for
from server.tools import ToolPlan, tool_plan


@dataclass(frozen=True)
class Plan:
    """Everything the service needs to run a request, in engine terms."""

    prompts: list[list[int]]  # token ids, counted and checked against the context already
    n: int
    max_tokens: int | None
    sampling: SamplingParams
    stops: list[str]
    logprobs: int | None
    echo: bool
    stream: bool
    include_usage: bool
    prompt_param: str = "prompt"  # the request field an over-long prompt is blamed on
    echo_texts: tuple[str, ...] = ()  # per prompt, when echo was asked for
    tools: ToolPlan | None = None  # chat: the tools offered and the reply's shape (server/tools.py)

    def seed_for(self, choice: int) -> SamplingParams:
        """Sampling parameters of one choice: the request seed offset by the choice index."""
        from dataclasses import replace

        return replace(self.sampling, seed=(self.sampling.seed + choice) & 0x7FFFFFFF)


def to_sampling(req: CompletionRequest | ChatCompletionRequest, model: ServedModel,
                constraint: Constraint | None = None) -> SamplingParams:
    """Map sampling fields, falling back to the model's registry defaults; `constraint`: the grammar the
    output must follow (chat's response_format, see server/structured.py)."""
    d = model.spec.sampling
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    return SamplingParams(
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=_top_p(req.top_p, d.top_p),
        top_k=d.top_k if req.top_k is None else req.top_k,
        repetition_penalty=d.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty,
        last_n_tokens=d.last_n_tokens,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=_logit_bias(req.logit_bias or {}, model.info.n_vocab),
        seed=seed & 0x7FFFFFFF,
        constraint=constraint,
    )


def _logit_bias(given: dict[str, int], n_vocab: int) -> dict[int, float]:
    """Token ids and biases; keys are ASCII digit strings (the request model checked), of any length."""
    if len(given) > n_vocab:
        raise bad_request(f"logit_bias has {len(given)} entries, but this model's vocabulary has only "
                          f"{n_vocab} tokens.", "logit_bias")
    digits = len(str(n_vocab))
    bias: dict[int, float] = {}
    for key, value in given.items():
        short = key.lstrip("0") or "0"
        token = int(short) if len(short) <= digits else n_vocab  # no int() of a huge digit string
        if token >= n_vocab:
            raise bad_request(f"logit_bias token {shorten(short)} is outside the vocabulary "
                              f"(0..{n_vocab - 1}).", "logit_bias")
        bias[token] = float(value)
    return bias


def _top_p(value: float | None, default: float) -> float:
    """top_p 0 means 'only the most likely token' (as greedy) in OpenAI's range; keep it positive."""
    if value is None:
        return default
    return value if value > 0 else 1e-6


def _stops(req: CompletionRequest | ChatCompletionRequest, model: ServedModel) -> list[str]:
    """The request's stop sequences plus the model's own."""
    user = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return [s for s in dict.fromkeys(user + model.spec.stop) if s]


def _n(req: CompletionRequest | ChatCompletionRequest, settings: Settings) -> int:
    n = req.n or 1
    if n > settings.max_n:
        raise bad_request(f"n={n} is above this server's limit of {settings.max_n}.", "n")
    return n


def _max_tokens(value: int | None, model: ServedModel, param: str) -> int | None:
    """Check max_tokens against the model's cap and context before any work."""
    if value is None:
        return None
    cap = model.spec.max_tokens_cap
    if cap is not None and value > cap:
        raise bad_request(f"{param}={value} is above this model's limit of {cap}.", param)
    if value > model.context_length:
        raise APIError(400, f"This model's maximum context length is {model.context_length} tokens, "
                            f"but {param} is {value}.", param=param, code="context_length_exceeded")
    return value


def _stream_flags(req: CompletionRequest | ChatCompletionRequest) -> tuple[bool, bool]:
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    opts = req.stream_options
    if opts is not None and opts.include_obfuscation:
        raise unsupported("stream_options.include_obfuscation")
    return stream, bool(opts and opts.include_usage)


def completion_plan(req: CompletionRequest, model: ServedModel, settings: Settings) -> Plan:
    """Validate a completions request and turn it into a plan (cheap checks first, tokenizing last)."""
    if req.suffix:
        raise unsupported("suffix", "GPT-J models have no insertion mode")
    n = _n(req, settings)
    if req.best_of not in (None, 0, 1, n):
        raise unsupported("best_of", "only best_of equal to n (or 1) is supported")
    if req.echo and req.logprobs is not None:
        raise unsupported("logprobs", "prompt log-probabilities (echo with logprobs) are not computed")
    stream, include_usage = _stream_flags(req)
    max_tokens = _max_tokens(16 if req.max_tokens is None else req.max_tokens, model, "max_tokens")
    items = _prompts(req.prompt, model, settings)
    for item in items:  # what cannot fit is refused by its size, before any per-id or per-byte work
        check_size(item, max_tokens, model, "prompt")
    for item in items:
        if isinstance(item, list):
            _check_ids(item, model)
    sampling = to_sampling(req, model)
    room = model.context_length - (max_tokens or 0)
    prompts = [tokenize(item, model, limit=room) for item in items]
    check_context(prompts, max_tokens, model, "prompt", at_least=not all(isinstance(i, list) for i in items))
    echo = tuple(_echo(item, ids, model) for item, ids in zip(items, prompts)) if req.echo else ()
    return Plan(prompts, n, max_tokens, sampling, _stops(req, model), req.logprobs,
                bool(req.echo), stream, include_usage, echo_texts=echo)


def tokenize(item: str | list[int], model: ServedModel, param: str = "prompt",
             limit: int | None = None) -> list[int]:
    """Token ids of a prompt with the model's own tokenizer (with a limit: at most limit + 1 of them)."""
    if isinstance(item, list):
        return item
    try:
        ids = model.tokenizer.encode(item, limit)
    except UnicodeEncodeError:
        raise bad_request("The prompt is not valid Unicode (it contains a lone surrogate).",
                          param, "invalid_unicode") from None
    if not ids:
        raise bad_request("The prompt is empty after tokenization.", param)
    return ids


def _echo(item: str | list[int], ids: list[int], model: ServedModel) -> str:
    if isinstance(item, str):
        return item
    return model.tokenizer.decode(ids).decode("utf-8", errors="replace")


def _too_long(limit: int, asked: str, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{asked}. Please reduce the length of the prompt or the completion.",
                    param=param, code="context_length_exceeded")


def check_size(item: str | list[int], max_tokens: int | None, model: ServedModel, param: str) -> None:
    """Refuse a prompt that cannot fit, by its length alone: token ids counted, text by UTF-8 bytes."""
    limit = model.context_length
    want = max_tokens if max_tokens is not None else 1
    if isinstance(item, list):
        if len(item) + want > limit:
            check_context([item], max_tokens, model, param)
        return
    cap = model.tokenizer.max_bytes(limit - want)
    if cap is None:
        return
    size = len(item) if item.isascii() else len(item.encode("utf-8", "surrogatepass"))
    if size > cap:
        fewest = -(-size // model.tokenizer.longest)
        raise _too_long(limit, f"at least {fewest + want} tokens (the prompt is {size} bytes, at least "
                               f"{fewest} tokens of at most {model.tokenizer.longest} bytes each; {want} for "
                               f"the completion)", param)


def check_context(prompts: list[list[int]], max_tokens: int | None, model: ServedModel, param: str,
                  at_least: bool = False) -> None:
    """400 context_length_exceeded unless every prompt plus max_tokens fits the context.

    at_least: prompts were tokenized with a limit, so an over-long one is counted only up to it.
    """
    limit = model.context_length
    longest = max(len(p) for p in prompts)
    want = max_tokens if max_tokens is not None else 1
    if longest + want > limit:
        more = "at least " if at_least else ""
        asked = f"{more}{longest + want} tokens ({more}{longest} in the prompt, {want} for the completion)" \
            if max_tokens is not None else f"{more}{longest} tokens in the prompt, leaving no room for a reply"
        raise _too_long(limit, asked, param)


def _prompts(prompt: Any, model: ServedModel, settings: Settings) -> list[str | list[int]]:
    """Normalise the four prompt shapes into a list of strings or token-id lists (no per-id work)."""
    eos = [model.info.eos_token_id if model.info.eos_token_id is not None else 0]
    if prompt is None or prompt == "":
        items: list[str | list[int]] = [eos]
    elif isinstance(prompt, str):
        items = [prompt]
    elif prompt and isinstance(prompt[0], int):  # the request model makes a list all one kind
        items = [prompt]
    else:
        items = [p if p != "" else eos for p in prompt]
    if not items:
        raise bad_request("prompt must not be an empty list.", "prompt")
    if len(items) > settings.max_prompts:
        raise bad_request(f"At most {settings.max_prompts} prompts per request.", "prompt")
    if any(isinstance(item, list) and not item for item in items):
        raise bad_request("A token-id prompt must have at least one token.", "prompt")
    return items


def _check_ids(item: list[int], model: ServedModel) -> None:
    """Every id in the vocabulary (call once the list is known to fit the context)."""
    n_vocab = model.info.n_vocab
    if min(item) < 0 or max(item) >= n_vocab:
        bad = next(t for t in item if not 0 <= t < n_vocab)
        raise bad_request(f"Token id {shorten(str(bad))} is outside the vocabulary (0..{n_vocab - 1}).",
                          "prompt")


def work_size(req: CompletionRequest | ChatCompletionRequest, settings: Settings) -> int:
    """A cheap estimate of the work a plan takes (characters, ids, entries), to decide where to build it."""
    size = len(req.logit_bias or ())
    if isinstance(req, CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return size + len(prompt)
        return size + sum(len(p) for p in (prompt or ())[:settings.max_prompts + 1])
    if len(req.messages) > 256 or (req.response_format and req.response_format.type != "text") \
            or req.tools or req.functions:
        return BIG_WORK  # a grammar is compiled (the first one of a model also builds its token trie)
    for m in req.messages:
        content = m.content
        if isinstance(content, str):
            size += len(content)
        elif content:
            size += sum(len(p.text or "") for p in content)
        size += sum(len(c.function.arguments) for c in m.tool_calls or ())
        size += len(m.function_call.arguments) if m.function_call else 0
    return size


BIG_WORK = 16_384  # a plan with more work than this is built in a thread, off the event loop


# chat fields accepted only with a value that asks for nothing special
_CHAT_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "modalities": (lambda v: v is None or v == ["text"], "only text output is supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: v is None, "these models do not reason"),
    "verbosity": (lambda v: v is None, "not supported by these models"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "only 'auto' and 'default' exist here"),
    "store": (lambda v: not v, "completions are not stored"),
    "metadata": (lambda v: not v, "metadata is only kept with store, which is not supported"),
    "web_search_options": (lambda v: v is None, "web search is not available"),
    "prompt_cache_key": (lambda v: v is None, "prefix caching is automatic; no key is needed"),
}


def chat_plan(req: ChatCompletionRequest, model: ServedModel, settings: Settings) -> Plan:
    """Validate a chat request and turn it into a plan (the prompt is rendered from the template)."""
    for field, (ok, why) in _CHAT_NEUTRAL.items():
        if not ok(getattr(req, field)):
            raise unsupported(field, why)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    n = _n(req, settings)
    stream, include_usage = _stream_flags(req)
    value, param = (req.max_completion_tokens, "max_completion_tokens")
    if value is None:
        value, param = req.max_tokens, "max_tokens"
    max_tokens = _max_tokens(value if value is not None else model.spec.sampling.max_tokens, model, param)
    asked = max_tokens if value is not None else None  # the registry default shrinks to what fits
    tools = tool_plan(req, model)
    constraint = constraint_for(req.response_format, model)
    if tools is not None and constraint is not None:
        raise unsupported("response_format", "a JSON response_format together with tools is not supported; "
                                             "use a tool whose parameters are the schema")
    sampling = to_sampling(req, model, constraint or (tools.constraint if tools else None))
    text = model.template.render(_messages(req.messages, model), model.spec.system_prompt,
                                 tools.tools if tools else None)
    check_size(text, asked, model, "messages")
    room = model.context_length - (asked if asked is not None else 1)
    prompt = tokenize(text, model, "messages", limit=room)
    check_context([prompt], asked, model, "messages", at_least=True)
    if asked is None and max_tokens is not None:
        max_tokens = min(max_tokens, model.context_length - len(prompt))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return Plan([prompt], n, max_tokens, sampling, _stops(req, model), logprobs,
                False, stream, include_usage, prompt_param="messages", tools=tools)


def _messages(messages: list[Any], model: ServedModel) -> list[tuple[str, ...]]:
    """The conversation as template turns: tool calls written in the template's convention, each tool
    result with the name of the tool it answers (found by its tool_call_id)."""
    names: dict[str, str] = {}
    turns: list[tuple[str, ...]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.audio:
            raise unsupported(f"{where}.audio")
        if m.name and m.role not in ("tool", "function"):
            raise unsupported(f"{where}.name", "the prompt templates do not write participant names")
        if m.role == "tool":
            _check_answer(where, m.tool_call_id, names)
        if m.role in ("tool", "function"):
            name = m.name if m.role == "function" else names.get(m.tool_call_id or "", m.name or "")
            if m.role == "function" and not name:
                raise bad_request(f"{where}.name is required for role 'function'.", f"{where}.name")
            turns.append(("tool", _content(where, m, empty_ok=False), name or ""))
            continue
        text = _content(where, m, empty_ok=m.role == "assistant")
        if m.role == "assistant" and (m.tool_calls or m.function_call):
            text += model.template.calls_text(_calls(where, m, names))
        turns.append((m.role, text))
    return turns


def _check_answer(where: str, call_id: str | None, names: dict[str, str]) -> None:
    """A tool message must answer a call of an earlier assistant message (by its tool_call_id), as OpenAI
    requires; else the template would render a result for a call that was never made."""
    if call_id is None:
        raise bad_request(f"{where}.tool_call_id is required for role 'tool'.", f"{where}.tool_call_id")
    if call_id not in names:
        raise bad_request(f"{where} has role 'tool' but its tool_call_id '{shorten(call_id, 64)}' answers no "
                          "tool call of an earlier assistant message.", f"{where}.tool_call_id")


def _calls(where: str, m: Any, names: dict[str, str]) -> list[dict]:
    """An assistant message's calls as {name, arguments} (arguments parsed from their JSON strings)."""
    made = [(f"{where}.tool_calls[{j}].function", c.function) for j, c in enumerate(m.tool_calls or [])]
    if m.function_call:
        made.append((f"{where}.function_call", m.function_call))
    for call in m.tool_calls or []:
        names[call.id] = call.function.name
    calls = []
    for param, fn in made:
        try:
            arguments = json.loads(fn.arguments) if fn.arguments.strip() else {}
        except (ValueError, RecursionError):
            raise bad_request(f"{param}.arguments is not valid JSON (or nested too deeply).",
                              f"{param}.arguments") from None
        calls.append({"name": fn.name, "arguments": arguments})
    return calls


def _content(where: str, m: Any, empty_ok: bool) -> str:
    """A message's text; rejects what the templates cannot express."""
    content = m.content
    if content is None:
        if empty_ok:
            return ""
        raise bad_request(f"{where}.content must be a string or a list of text parts.", f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise unsupported(f"{where}.content[{j}].type",
                              f"only text parts are supported, got '{shorten(part.type)}'")
        texts.append(part.text)
    return "\n".join(texts)
