"""Prompt templates are data and render multi-turn conversations."""

import pytest

from backends.templates import BUILTIN_TEMPLATES, PromptTemplate


def test_gpt4all_j_format_with_default_system_prompt():
    t = BUILTIN_TEMPLATES["gpt4all-j"]
    out = t.render([("user", "Hi")], "Be brief.")
    assert out == "Be brief.\n### Prompt:\nHi\n### Response:\n"


def test_multi_turn_history_and_explicit_system_replaces_default():
    t = BUILTIN_TEMPLATES["gpt4all-j"]
    msgs = [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")]
    out = t.render(msgs, "default")
    assert out == "S\n### Prompt:\na\n### Response:\nb\n### Prompt:\nc\n### Response:\n"


def test_developer_counts_as_system():
    t = PromptTemplate(system="<{content}>", user="[{content}]")
    assert t.render([("developer", "d"), ("user", "u")], "x") == "<d>[u]"


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError):
        BUILTIN_TEMPLATES["plain"].render([("wizard", "x")])


def test_content_with_braces_is_not_formatted():
    t = BUILTIN_TEMPLATES["plain"]
    assert t.render([("user", "{content} {x}")]) == "{content} {x}\n"
