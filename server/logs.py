"""Logging for every logger (the app's, uvicorn's, any library's): one format, control characters escaped.

Text lines are `<time> <LEVEL> <logger>: <message>`; a traceback follows on lines that start with
`  | `. Control characters (C0, DEL, C1) and Unicode line/paragraph separators in a message are written
as escapes (`\\n`, `\\x1b`, `\\u2028`), so client text such as a path `/x%0A<fake line>` cannot start a
line of its own. JSON lines hold one object per record: time, level, logger, message, any extra
fields, and `exc_info` (the traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONTINUATION = "\n  | "
_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
           "info": logging.INFO, "debug": logging.DEBUG, "trace": 5}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
_ESCAPES = str.maketrans({chr(c): _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
                          for c in _UNSAFE})
# attributes every LogRecord has; anything else on a record came from `extra=` and goes into JSON lines
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}


def escape(text: str) -> str:
    """Text with every control character written as a visible escape (one line, no terminal codes)."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message>`; the message escaped, a traceback on `  | ` lines."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        for extra in _details(self, record):
            line += "".join(CONTINUATION + escape(part) for part in extra.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; non-ASCII and control characters are \\u escapes."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        details = _details(self, record)
        if details:
            entry["exc_info"] = "\n".join(details)
        return json.dumps(entry, ensure_ascii=True, default=str)


def _details(formatter: logging.Formatter, record: logging.LogRecord) -> list[str]:
    """The record's traceback and stack text, if any."""
    out = []
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    if record.exc_text:
        out.append(record.exc_text)
    if record.stack_info:
        out.append(formatter.formatStack(record.stack_info))
    return out


def _iso_time(created: float) -> str:
    """ISO 8601 local time with milliseconds and UTC offset."""
    local = time.localtime(created)
    offset = time.strftime("%z", local)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(created % 1 * 1000):03d}"
            + f"{offset[:3]}:{offset[3:]}")


def level_number(name: str) -> int:
    """The logging level for a --log-level name (ValueError naming the choices if unknown)."""
    try:
        return _LEVELS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"--log-level {name!r} is not one of: {', '.join(_LEVELS)}") from None


def configure(settings) -> None:
    """Send every logger's records to stderr in the chosen format (settings.log_format, log_level)."""
    setup(settings.log_format, settings.log_level)


def setup(log_format: str, level: str) -> None:
    """The root handler on stderr in `log_format` (text or json) at `level`; uvicorn's loggers go through it.

    Worker processes call this too (with GPT4ALL_J_LOG_FORMAT, which the server exports), so their
    lines look like the server's.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number(level))
    logging.addLevelName(5, "TRACE")
    # uvicorn's own loggers propagate to the root handler (it is given log_config=None)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    logging.captureWarnings(True)
