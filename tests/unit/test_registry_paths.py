"""Which registry is used (flag/env, ./model_registry.yaml, per-user), and the per-user one made on first run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from backends.registry import entry_file, load_registry_file, locate_registry, resolve
from backends.registry_paths import bundled_registry_text, find_registry
from server.model_cli import registry_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def user_dirs(tmp_path, monkeypatch) -> dict[str, Path]:
    """An empty current folder and private XDG folders."""
    dirs = {name: tmp_path / name for name in ("cwd", "config", "data", "home")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.chdir(dirs["cwd"])
    monkeypatch.setenv("HOME", str(dirs["home"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(dirs["config"]))
    monkeypatch.setenv("XDG_DATA_HOME", str(dirs["data"]))
    monkeypatch.delenv("GPT4ALL_J_REGISTRY", raising=False)
    monkeypatch.delenv("GPT4ALL_J_DATA_DIR", raising=False)
    return dirs


def test_the_bundled_registry_equals_the_top_level_one_byte_for_byte():
    assert (ROOT / "backends" / "model_registry.yaml").read_bytes() == (ROOT / "model_registry.yaml").read_bytes()
    assert bundled_registry_text().encode() == (ROOT / "model_registry.yaml").read_bytes()


def test_first_run_creates_the_per_user_registry_with_models_in_the_data_folder(user_dirs, caplog):
    caplog.set_level(logging.INFO, logger="backends.registry_paths")
    path = locate_registry(None, None)
    assert path == user_dirs["config"] / "gpt4all-j-server" / "model_registry.yaml"
    assert "created the per-user registry" in caplog.text and str(path) in caplog.text
    assert path.read_text().endswith(bundled_registry_text())
    parsed = load_registry_file(path)
    data = user_dirs["data"] / "gpt4all-j-server"
    assert parsed.model_dir == str(data)
    demo = next(m for m in parsed.models if m.id == "demo")
    assert entry_file(path, demo, parsed.model_dir) == data / "models" / "demo-gptj-q4_0.bin"
    reg = resolve(path, default_threads=1)  # writes the demo model into the data folder
    assert [m.spec.id for m in reg.served] == ["demo"]
    assert (data / "models" / "demo-gptj-q4_0.bin").is_file()
    assert not list(user_dirs["cwd"].iterdir())  # nothing written in the current folder
    # later runs use it as it is (the user may have edited it)
    path.write_text(path.read_text() + "# edited\n")
    caplog.clear()
    assert locate_registry(None, None) == path and path.read_text().endswith("# edited\n")
    assert "the per-user registry (no model_registry.yaml in the current folder)" in caplog.text


def test_data_dir_setting_and_home_defaults(user_dirs, monkeypatch):
    path = locate_registry(None, user_dirs["home"] / "models-here")
    assert load_registry_file(path).model_dir == str(user_dirs["home"] / "models-here")
    path.unlink()
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    path = locate_registry(None, None)
    assert path == user_dirs["home"] / ".config" / "gpt4all-j-server" / "model_registry.yaml"
    assert load_registry_file(path).model_dir == str(user_dirs["home"] / ".local/share/gpt4all-j-server")


def test_lookup_order_flag_then_current_folder_then_per_user(user_dirs, caplog):
    caplog.set_level(logging.INFO, logger="backends.registry_paths")
    given = user_dirs["home"] / "mine.yaml"
    assert locate_registry(given, None) == given and "given by --registry" in caplog.text
    here = user_dirs["cwd"] / "model_registry.yaml"
    here.write_text("models:\n  - {id: a, path: a.bin}\n")
    assert locate_registry(None, None) == here and "found in the current folder" in caplog.text
    assert not (user_dirs["config"] / "gpt4all-j-server").exists()
    assert locate_registry(given, None) == given


def test_model_dir_is_relative_to_the_registry_folder(tmp_path):
    path = tmp_path / "reg.yaml"
    path.write_text(json.dumps({"model_dir": "weights", "models": [{"id": "a", "path": "a.bin"},
                                                                   {"id": "b", "path": "/abs/b.bin"}]}))
    parsed = load_registry_file(path)
    assert [entry_file(path, m, parsed.model_dir) for m in parsed.models] == [tmp_path / "weights/a.bin",
                                                                             Path("/abs/b.bin")]


def test_the_model_commands_use_the_same_lookup(user_dirs, monkeypatch, capsys):
    path = registry_path(None)
    assert path == user_dirs["config"] / "gpt4all-j-server" / "model_registry.yaml"
    assert f"registry: {path} (created the per-user registry" in capsys.readouterr().err
    monkeypatch.setenv("GPT4ALL_J_REGISTRY", str(user_dirs["home"] / "env.yaml"))
    assert registry_path(None) == user_dirs["home"] / "env.yaml"
    assert registry_path(Path("flag.yaml")) == Path("flag.yaml")


def test_an_unwritable_config_folder_is_a_clear_error(user_dirs, monkeypatch):
    from backends.registry import RegistryError

    blocker = user_dirs["home"] / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    with pytest.raises(RegistryError, match="cannot create the per-user registry.*--registry"):
        find_registry(None, None)


def test_a_later_data_dir_does_not_silently_move_the_models(user_dirs, caplog):
    path = locate_registry(None, None)
    caplog.set_level(logging.WARNING, logger="backends.registry_paths")
    assert locate_registry(None, user_dirs["home"] / "elsewhere") == path
    assert f"data_dir {user_dirs['home'] / 'elsewhere'} is not used" in caplog.text
    assert "edit model_dir" in caplog.text
