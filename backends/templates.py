"""Prompt templates as named data: how a chat conversation (with tools, calls and results) becomes one prompt."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_FIELD = re.compile(r"\{(content|name|description|parameters|tools|marker|calls)\}")


def fill(fmt: str, **values: str) -> str:
    """Replace the named {placeholders} of a template string in one pass (values are never re-scanned)."""
    return _FIELD.sub(lambda m: values.get(m.group(1), m.group(0)), fmt)


@dataclass(frozen=True)
class PromptTemplate:
    """Format strings per role; `{content}` is replaced by the message text.

    Tool calling: `tools` is the block listing the callable tools (placed as a system message after the
    leading system messages; `{tools}` = one `tool` line per tool, `{marker}` = `tool_marker`); the model
    calls tools by writing `tool_marker` then a JSON array `[{"name": ..., "arguments": {...}}]`;
    `tool_call` is how an assistant's calls are written in the history (after its text, if any), and
    `tool_result` how a role "tool" message is written (`{name}`: the tool it answers).
    """

    system: str = "{content}\n"
    user: str = "{content}\n"
    assistant: str = "{content}\n"
    generation: str = ""  # appended after the last message: where the model starts answering
    tool_marker: str = "<tool_call>"
    tools: str = ("You can call these tools:\n{tools}To call tools, reply with {marker} followed by a JSON array "
                  'of calls, [{"name": "<tool name>", "arguments": {<arguments>}}], and nothing else.')
    tool: str = "- {name}: {description} Parameters: {parameters}\n"
    tool_call: str = "{marker}{calls}"
    tool_result: str = "Result of {name}: {content}\n"

    def render(self, messages: list[tuple[str, ...]], default_system: str | None = None,
               tools: list[dict] | None = None) -> str:
        """Render (role, content) messages (a "tool" message: (role, content, name)); the default system
        prompt applies when none is given; `tools` (name, description, parameters) are listed after the
        leading system messages."""
        parts: list[str] = []
        if default_system and not any(m[0] in ("system", "developer") for m in messages):
            parts.append(self.system.replace("{content}", default_system))
        lead = next((i for i, m in enumerate(messages) if m[0] not in ("system", "developer")), len(messages))
        for i, message in enumerate(messages):
            if i == lead and tools:
                parts.append(self.system.replace("{content}", self.tools_text(tools)))
            parts.append(self._turn(message))
        if lead == len(messages) and tools:
            parts.append(self.system.replace("{content}", self.tools_text(tools)))
        parts.append(self.generation)
        return "".join(parts)

    def _turn(self, message: tuple[str, ...]) -> str:
        role, content = message[0], message[1]
        if role == "tool":
            return fill(self.tool_result, content=content, name=message[2] if len(message) > 2 else "")
        return self.for_role(role).replace("{content}", content)

    def tools_text(self, tools: list[dict]) -> str:
        """The block that presents the tools and the calling convention."""
        lines = "".join(fill(self.tool, name=t["name"], description=t.get("description") or "",
                             parameters=json.dumps(t.get("parameters") or {"type": "object"},
                                                   separators=(",", ":")))
                        for t in tools)
        return fill(self.tools, tools=lines, marker=self.tool_marker)

    def calls_text(self, calls: list[dict]) -> str:
        """An assistant's tool calls as the model writes them: the marker and the JSON array."""
        text = json.dumps(calls, separators=(",", ":"), ensure_ascii=False)
        return fill(self.tool_call, marker=self.tool_marker, calls=text)

    def for_role(self, role: str) -> str:
        """The format string of a role (developer counts as system)."""
        if role in ("system", "developer"):
            return self.system
        if role == "assistant":
            return self.assistant
        if role == "user":
            return self.user
        raise ValueError(f"role {role!r} is not supported by prompt templates")


BUILTIN_TEMPLATES: dict[str, PromptTemplate] = {
    # GPT4All-J was fine-tuned on "### Prompt:" / "### Response:" turns.
    "gpt4all-j": PromptTemplate(
        system="{content}\n",
        user="### Prompt:\n{content}\n",
        assistant="### Response:\n{content}\n",
        generation="### Response:\n",
        tool_result="### Prompt:\nResult of {name}: {content}\n",
    ),
    # Messages joined by newlines, no markers: for base models and tests.
    "plain": PromptTemplate(system="{content}\n", user="{content}\n", assistant="{content}\n"),
}
