"""Prompt templates as named data: how a chat conversation becomes one prompt string."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    """Format strings per role; `{content}` is replaced by the message text."""

    system: str = "{content}\n"
    user: str = "{content}\n"
    assistant: str = "{content}\n"
    generation: str = ""  # appended after the last message: where the model starts answering

    def render(self, messages: list[tuple[str, str]], default_system: str | None = None) -> str:
        """Render (role, content) messages; the default system prompt applies when none is given."""
        parts: list[str] = []
        if default_system and not any(role in ("system", "developer") for role, _ in messages):
            parts.append(self.system.replace("{content}", default_system))
        for role, content in messages:
            parts.append(self.for_role(role).replace("{content}", content))
        parts.append(self.generation)
        return "".join(parts)

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
    ),
    # Messages joined by newlines, no markers: for base models and tests.
    "plain": PromptTemplate(system="{content}\n", user="{content}\n", assistant="{content}\n"),
}
