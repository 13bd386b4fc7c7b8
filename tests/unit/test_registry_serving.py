"""What the registry tells the server: why a registered model is not served, and when threads oversubscribe."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from backends import registry
from backends.registry import resolve
from tests.models import write_successor

ROOT = Path(__file__).resolve().parents[2]


def test_unserved_names_the_pull_command_for_an_id_or_alias(tmp_path):
    write_successor(tmp_path / "good.bin")
    path = tmp_path / "reg.yaml"
    path.write_text("models:\n"
                    "  - {id: good, path: good.bin, threads: 1}\n"
                    "  - {id: big, aliases: [big-alias], path: big.bin, url: 'http://example.invalid/b.bin'}\n"
                    "  - {id: local, path: local.bin}\n"
                    "  - {id: folder, path: folder.bin}\n")
    (tmp_path / "folder.bin").mkdir()
    reg = resolve(path)
    # clients get the pull command without the server's registry path; the log has the full command
    assert reg.unserved("big-alias") == ("big", "registered but not downloaded: run `gpt4all-j-server pull big` "
                                                "on the server")
    assert f"gpt4all-j-server pull big --registry {path}" in reg.skipped["big"]
    assert reg.not_downloaded == {"big", "local"}
    assert reg.unserved("big") == reg.unserved("big-alias")
    assert reg.unserved("local") == ("local", "registered but its model file is not on the server")
    assert reg.unserved("folder") == ("folder", "registered but its model file on the server is not a file")
    assert reg.unserved("good") is None and reg.unserved("nope") is None
    assert "big" in reg.skipped and str(tmp_path / "big.bin") in reg.skipped["big"]  # the log keeps the path
    assert all(str(tmp_path) not in reason
               for _, reason in filter(None, map(reg.unserved, ["big", "local", "folder"])))


def test_no_registry_option_for_the_registry_found_in_the_current_folder(tmp_path, monkeypatch):
    shutil.copy(ROOT / "model_registry.yaml", tmp_path / "model_registry.yaml")
    monkeypatch.chdir(tmp_path)
    reg = resolve(Path("model_registry.yaml"), create_missing=False)
    assert reg.unserved("gpt4all-j") == ("ggml-gpt4all-j-v1.3-groovy", "registered but not downloaded: run "
                                         "`gpt4all-j-server pull ggml-gpt4all-j-v1.3-groovy` on the server")
    assert "pull ggml-gpt4all-j-v1.3-groovy (" in reg.skipped["ggml-gpt4all-j-v1.3-groovy"]


def _served_gpt4all_j_entries(tmp_path: Path, threads: str = "") -> Path:
    """The bundled registry with all four GPT4All-J entries' files present (a small stand-in file)."""
    reg = tmp_path / "model_registry.yaml"
    text = (ROOT / "model_registry.yaml").read_text()
    if threads:
        text = text.replace("    workers: 1  #", f"    workers: 1\n    threads: {threads}  #")
    reg.write_text(text)
    write_successor(tmp_path / "stand-in.bin", n_ctx=2048)
    for name in ("ggml-gpt4all-j-v1.3-groovy", "ggml-gpt4all-j-v1.2-jazzy", "ggml-gpt4all-j-v1.1-breezy",
                 "ggml-gpt4all-j"):
        (tmp_path / "models").mkdir(exist_ok=True)
        shutil.copy(tmp_path / "stand-in.bin", tmp_path / "models" / f"{name}.bin")
    return reg


def test_default_entries_without_threads_never_warn_on_a_small_machine(tmp_path, monkeypatch, caplog):
    for cpus in (1, 2):
        monkeypatch.setattr(registry, "usable_cpus", lambda: cpus)
        caplog.clear()
        reg = resolve(_served_gpt4all_j_entries(tmp_path))
        assert len(reg.served) == 5  # the demo and the four GPT4All-J releases
        assert [m.threads for m in reg.served] == [1] + [cpus] * 4  # each model alone may use every CPU
        assert "engine threads" not in caplog.text, caplog.text


def test_threads_someone_chose_still_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(registry, "usable_cpus", lambda: 2)
    resolve(_served_gpt4all_j_entries(tmp_path, threads="2"))
    assert "registry asks for 9 engine threads (workers x threads of demo, ggml-gpt4all-j-v1.3-groovy" \
           in caplog.text and "on 2 CPUs" in caplog.text
    caplog.clear()
    resolve(_served_gpt4all_j_entries(tmp_path), default_threads=2)  # --default-threads is a choice too
    assert "registry asks for 9 engine threads" in caplog.text
