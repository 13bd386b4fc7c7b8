"""Log lines cannot be forged: control characters are escaped (text) or JSON-encoded (json), any logger."""

from __future__ import annotations

import io
import json
import logging
import re
import unicodedata

import pytest

from server import logs
from server.settings import Settings


def record(message: str, *args, exc: BaseException | None = None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("some.logger", logging.WARNING, __file__, 1, message, args,
                            (type(exc), exc, exc.__traceback__) if exc else None)
    rec.__dict__.update(extra)
    return rec


def test_escape_leaves_no_control_or_line_breaking_character():
    every = "".join(chr(c) for c in range(0x2030))
    out = logs.escape(every)
    assert not [ch for ch in out if unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029"]
    assert logs.escape("a\nb\r\x1b[31mc\x85d\u2028") == "a\\nb\\r\\x1b[31mc\\x85d\\u2028"
    assert logs.escape("plain text, ünïcode, 漢字") == "plain text, ünïcode, 漢字"


def test_a_text_line_is_one_line_whatever_the_message_holds():
    line = logs.TextFormatter().format(record('"GET %s" 404', "/x\n2026-01-01 00:00:00,000 INFO fake: forged"))
    assert "\n" not in line
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING some\.logger: \"GET /x\\n2026", line)


def test_a_traceback_follows_on_marked_lines_that_cannot_pass_for_records():
    try:
        raise ValueError("bad\n2026-01-01 00:00:00,000 INFO fake: forged\x1b[2J")
    except ValueError as exc:
        line = logs.TextFormatter().format(record("failed", exc=exc))
    first, *rest = line.split("\n")
    assert first.endswith("some.logger: failed") and rest
    assert all(part.startswith("  | ") for part in rest)
    assert "\x1b" not in line and "\\x1b[2J" in line


def test_json_lines_hold_the_record_extras_and_the_traceback():
    try:
        raise RuntimeError("boom\nforged")
    except RuntimeError as exc:
        line = logs.JsonFormatter().format(record("model %s\n", "m\u2028", exc=exc, request_id="r1"))
    assert "\n" not in line and line.isascii()
    entry = json.loads(line)
    assert entry["message"] == "model m\u2028\n" and entry["level"] == "WARNING"
    assert entry["logger"] == "some.logger" and entry["request_id"] == "r1"
    assert "RuntimeError: boom\nforged" in entry["exc_info"]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", entry["time"])


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_routes_uvicorn_and_app_loggers_through_one_format(fmt, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure(Settings(log_format=fmt, log_level="info"))
        logging.getLogger("uvicorn.error").info("Application startup complete.")
        logging.getLogger("gpt4all_j_server.access").info('"GET /x\nforged" 404')
    finally:
        root.handlers, root.level = saved
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    if fmt == "json":
        assert [json.loads(line)["logger"] for line in lines] == ["uvicorn.error", "gpt4all_j_server.access"]
    else:
        assert all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", line) for line in lines)


def test_an_unknown_log_level_is_a_clear_error():
    with pytest.raises(ValueError, match="verbose.*debug"):
        logs.level_number("verbose")
