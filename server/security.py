"""Authentication setup: API keys (a setting meant to hold keys never turns auth off silently), the paths
open without a key, who sees /ready's details, and what the startup log says about exposure."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from server.docs import DOCS_PATHS
from server.routes.ui import UI_PREFIX

if TYPE_CHECKING:
    from server.settings import Settings


class ConfigError(ValueError):
    """A configuration the server refuses to start with; the message is one line, for `error: ...`."""


def load_api_keys(settings: Settings) -> list[str]:
    """Every accepted key, --api-keys first then the key file, without duplicates (ConfigError if unusable)."""
    if settings.api_keys_blank():
        raise ConfigError("--api-keys (GPT4ALL_J_API_KEYS) is set but holds no key: give one or more "
                          "comma-separated keys, or leave it unset or empty to run without authentication")
    keys = list(settings.api_keys)
    for index, key in enumerate(keys, 1):
        _check_key(key, f"key {index} of --api-keys (GPT4ALL_J_API_KEYS)")
    if settings.api_key_file is not None:
        keys += _read_key_file(settings.api_key_file)
    return list(dict.fromkeys(keys))


def _read_key_file(path: Path) -> list[str]:
    """The keys of a key file: one per line; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the API key file {path} is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            _check_key(line, f"line {number} of the API key file {path}")
            keys.append(line)
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key (only blank lines or # comments): put one "
                          "key per line, or unset --api-key-file to run without authentication")
    return keys


def _check_key(key: str, where: str) -> None:
    """A key must be something a client can send in an Authorization header (the key is never echoed)."""
    if not all("!" <= ch <= "~" for ch in key):
        raise ConfigError(f"{where}: an API key may hold only printable ASCII characters without spaces")


def open_paths(settings: Settings) -> set[str]:
    """Paths served without a key when keys are set; an entry ending in "/" opens everything below it, except
    "/" itself, which is the chat page alone (its files hold no data: the page asks for a key)."""
    paths: set[str] = set()
    if settings.ui:
        paths |= {"/", UI_PREFIX}
    if not settings.auth_health:
        paths |= {"/health", "/ready"}
    if not settings.auth_metrics:
        paths.add("/metrics")
    if not settings.auth_docs:
        paths |= DOCS_PATHS
    return paths


def is_loopback(host: str) -> bool:
    """Whether an address or host name is this machine only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def sees_details(key_ok: bool | None, client: tuple[str, int] | list | None) -> bool:
    """/ready details: with keys set, for a valid key; with none set, for clients on this machine only."""
    if key_ok is not None:
        return key_ok
    return bool(client) and is_loopback(str(client[0]))


def startup_notes(settings: Settings, keys: list[str]) -> list[tuple[int, str]]:
    """(logging level, message) pairs saying whether auth is on and warning about an open exposed server."""
    if keys:
        count = f"{len(keys)} key" + ("s" if len(keys) != 1 else "")
        note = f"API key authentication is on ({count})"
        public = sorted(p + "*" if p.endswith("/") and p != "/" else p for p in open_paths(settings))
        if public:
            note += "; open without a key: " + ", ".join(public)
        return [(logging.INFO, note)]
    if is_loopback(settings.host):
        return [(logging.INFO, f"API key authentication is off (no --api-keys or --api-key-file); listening "
                               f"on {settings.host}, reachable from this machine only")]
    return [(logging.WARNING,
             f"API key authentication is off and the server listens on {settings.host}, beyond this machine: "
             f"anyone who can reach port {settings.port} can use it. Set --api-keys or --api-key-file "
             f"(GPT4ALL_J_API_KEYS / GPT4ALL_J_API_KEY_FILE), or bind --host 127.0.0.1")]
