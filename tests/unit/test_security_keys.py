"""API key loading refuses settings that would silently turn auth off; startup notes; loopback checks."""

import logging

import pytest

from server.security import ConfigError, is_loopback, load_api_keys, open_paths, sees_details, startup_notes
from server.settings import Settings


def keys(**kw) -> list[str]:
    return load_api_keys(Settings(**kw))


@pytest.mark.parametrize("given", [" , ", ",", " ", ",,, ,", ["", " "]])
def test_api_keys_given_without_a_key_is_refused(given):
    with pytest.raises(ConfigError, match="holds no key"):
        keys(api_keys=given)


def test_api_keys_from_the_environment_without_a_key_is_refused(monkeypatch):
    monkeypatch.setenv("GPT4ALL_J_API_KEYS", " , ")
    with pytest.raises(ConfigError, match="GPT4ALL_J_API_KEYS"):
        load_api_keys(Settings())


def test_empty_or_unset_api_keys_mean_no_auth(monkeypatch):
    assert keys() == [] and keys(api_keys="") == [] and keys(api_keys=[]) == []
    monkeypatch.setenv("GPT4ALL_J_API_KEYS", "")  # compose's `${GPT4ALL_J_API_KEYS:-}`
    assert load_api_keys(Settings()) == []


def test_keys_from_setting_and_file_in_order_without_duplicates(tmp_path):
    f = tmp_path / "keys"
    f.write_text("\ufeff# comment\n\n  sk-b  \r\n  # indented comment\nsk-a\nsk-c\n", encoding="utf-8")
    assert keys(api_keys=" sk-a , sk-b ", api_key_file=f) == ["sk-a", "sk-b", "sk-c"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only\n  # comments\n\n"])
def test_key_file_without_a_key_is_refused(tmp_path, text):
    f = tmp_path / "keys"
    f.write_text(text)
    with pytest.raises(ConfigError, match="holds no key") as err:
        keys(api_key_file=f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_key_files_give_one_line_errors(tmp_path):
    cases = {tmp_path / "absent": "No such file or directory", tmp_path: "Is a directory"}
    bad = tmp_path / "latin1"
    bad.write_bytes(b"sk-\xe9\n")
    cases[bad] = "not UTF-8 text"
    for path, why in cases.items():
        with pytest.raises(ConfigError) as err:
            keys(api_key_file=path)
        message = str(err.value)
        assert str(path) in message and why in message and "\n" not in message, message


def test_a_key_a_client_cannot_send_is_refused_without_echoing_it(tmp_path):
    f = tmp_path / "keys"
    f.write_text("good\nsk secret with spaces\n")
    with pytest.raises(ConfigError, match="line 2 of the API key file") as err:
        keys(api_key_file=f)
    assert "secret" not in str(err.value)
    with pytest.raises(ConfigError, match="key 2 of --api-keys"):
        keys(api_keys="ok,caf\u00e9")


@pytest.mark.parametrize("host,local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
    ("192.168.1.5", False), ("example.com", False), ("", False)])
def test_loopback(host, local):
    assert is_loopback(host) is local


def test_startup_notes():
    notes = startup_notes(Settings(host="0.0.0.0"), [])
    assert [level for level, _ in notes] == [logging.WARNING]
    assert "0.0.0.0" in notes[0][1] and "--api-keys" in notes[0][1]
    for host in ("127.0.0.1", "::1", "localhost"):
        assert all(level < logging.WARNING for level, _ in startup_notes(Settings(host=host), []))
    level, note = startup_notes(Settings(host="0.0.0.0"), ["a", "b"])[0]
    assert level == logging.INFO and note.startswith("API key authentication is on (2 keys)")
    assert "/health" in note and "/docs" not in note
    assert "(1 key)" in startup_notes(Settings(), ["a"])[0][1]


def test_open_paths_follow_the_auth_settings():
    assert open_paths(Settings()) == {"/health", "/ready", "/metrics", "/", "/ui/"}
    assert open_paths(Settings(auth_health=True, auth_metrics=True, ui=False)) == set()
    docs = open_paths(Settings(auth_health=True, auth_metrics=True, auth_docs=False, ui=False))
    assert docs == {"/docs", "/redoc", "/openapi.json", "/docs-assets/"}


def test_who_sees_ready_details():
    assert sees_details(True, ("203.0.113.9", 1)) and not sees_details(False, ("127.0.0.1", 1))
    assert sees_details(None, ("127.0.0.1", 5)) and sees_details(None, ("::1", 5))
    assert not sees_details(None, ("203.0.113.9", 5)) and not sees_details(None, None)
