"""Registry files that are not sane YAML, and model paths that are not files: clear errors, never a hang."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from backends.registry import RegistryError, load_registry_file, resolve
from server.cli import main
from tests.models import write_successor


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "reg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def error_of(path: Path) -> str:
    with pytest.raises(RegistryError) as err:
        load_registry_file(path)
    return str(err.value)


def test_a_file_that_is_not_utf8_names_the_line_and_byte(tmp_path):
    path = write(tmp_path, b"models:\n  - id: a\n    path: caf\xe9.bin\n")
    message = error_of(path)
    assert message.startswith(f"{path}: line 3, column 14: not UTF-8 text (byte 0xe9)"), message


@pytest.mark.parametrize("text", ["[" * 5000, "models: " + "{a: " * 3000, "- " * 3000 + "x",
                                  "models:\n  - id: a\n    path: a.bin\n    sampling: " + "[" * 100 + "]" * 100])
def test_very_deep_yaml_is_refused_without_a_recursion_error(tmp_path, text):
    message = error_of(write(tmp_path, text))
    assert "nested more than 32 levels deep" in message and str(tmp_path / "reg.yaml") in message


def test_aliases_cannot_build_a_deep_or_huge_document(tmp_path):
    chain = "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60))
    message = error_of(write(tmp_path, "a0: &a0 [x]\n" + chain))
    assert "nested more than 32 levels deep" in message
    laughs = "l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, *l{i - 1}, "
        f"*l{i - 1}, *l{i - 1}]\n" for i in range(1, 9))
    assert "more than 1,000,000 values once its aliases are expanded" in error_of(write(tmp_path, laughs))
    assert "nested more than" in error_of(write(tmp_path, "a: &a [*a]\n"))  # a cycle


@pytest.mark.parametrize("text,expected", [
    ("models:\n  - id: a\n    path: one.bin\n    path: two.bin\n",
     "line 4: models[0] (id 'a'): duplicate key 'path' (first on line 3)"),
    ("models:\n  - {id: a, path: a.bin}\nmodels:\n  - {id: b, path: b.bin}\n",
     "line 3: top level: duplicate key 'models' (first on line 1)"),
    ("models:\n  - id: a\n    path: a.bin\n    sampling:\n      top_k: 1\n      top_k: 2\n",
     "line 6: models[0] (id 'a'): field 'sampling': duplicate key 'top_k' (first on line 5)"),
    ("templates:\n  t: {user: x, user: y}\nmodels:\n  - {id: a, path: a.bin}\n",
     "line 2: templates['t']: duplicate key 'user' (first on line 2)"),
])
def test_duplicate_keys_name_the_line_the_entry_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert f"{path}: {expected}" in error_of(path)


def test_merge_keys_still_work(tmp_path):
    path = write(tmp_path, "base: &b {path: a.bin, workers: 2}\nmodels:\n  - {<<: *b, id: a, workers: 1}\n")
    with pytest.raises(RegistryError, match="'base'.*Extra inputs"):  # the merge works; `base` is unknown
        load_registry_file(path)


def test_the_registry_itself_must_be_a_regular_file(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    assert "it is a directory, not a file" in error_of(tmp_path / "dir.yaml")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "it is a FIFO (named pipe), not a file" in _without_hanging(lambda: error_of(fifo))


def _without_hanging(call):
    """Run call in a thread; fail (instead of hanging the run) if it blocks, e.g. by opening a FIFO."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "blocked (opened a FIFO?)"
    return result[0]


def test_model_paths_that_are_not_files_say_what_they_are(tmp_path, capsys):
    write_successor(tmp_path / "good.bin")
    (tmp_path / "folder.bin").mkdir()
    os.mkfifo(tmp_path / "pipe.bin")
    path = write(tmp_path, "models:\n"
                           "  - {id: good, path: good.bin, threads: 1}\n"
                           "  - {id: folder, path: folder.bin}\n"
                           "  - {id: pipe, path: pipe.bin, create_if_missing: demo}\n"
                           "  - {id: dev, path: /dev/null}\n")
    reg = _without_hanging(lambda: resolve(path))
    assert [m.spec.id for m in reg.served] == ["good"]
    for ident, kind in [("folder", "a directory"), ("pipe", "a FIFO (named pipe)"), ("dev", "a character device")]:
        reason = reg.skipped[ident]
        assert f"is {kind}, not a model file" in reason and "field 'path'" in reason and str(path) in reason
        assert "missing" not in reason
    assert (tmp_path / "pipe.bin").is_fifo()  # create_if_missing did not write over it
    assert _without_hanging(lambda: main(["models", "list", "--registry", str(path)])) == 0
    table = capsys.readouterr().out
    assert "not a file (a directory)" in table and "not a file (a FIFO (named pipe))" in table
    assert _without_hanging(lambda: main(["verify", "pipe", "--registry", str(path)])) == 1
    assert "is a FIFO (named pipe), not a model file" in capsys.readouterr().out


def test_an_unreadable_model_file_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from backends import registry

    def refuse(path):
        raise PermissionError(13, "Permission denied")

    write_successor(tmp_path / "locked.bin")
    monkeypatch.setattr(registry, "inspect_model", refuse)  # root can read anything: simulate a 0600 file
    reg = resolve(write(tmp_path, "models:\n  - {id: locked, path: locked.bin}\n"))
    assert reg.skipped["locked"] == f"model file {tmp_path / 'locked.bin'} cannot be read: Permission denied"
    assert reg.unserved("locked") == ("locked", "registered but its model file on the server cannot be read")
