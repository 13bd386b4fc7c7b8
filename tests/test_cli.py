"""The command line: console script and `python -m server`, make-model and inspect."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_console_script_and_module_both_work():
    script = shutil.which("gpt4all-j-server") or str(Path(sys.executable).with_name("gpt4all-j-server"))
    assert os.path.exists(script), "the gpt4all-j-server console script is not installed"
    out = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--registry" in out.stdout and "GPT4ALL_J_REGISTRY" in out.stdout
    out = run("--help")
    assert out.returncode == 0 and "make-model" in out.stdout


def test_make_model_is_deterministic_and_inspectable(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    for path in (a, b):
        out = run("make-model", str(path), "--n-embd", "64", "--n-layer", "2", "--ftype", "q5_1",
                  "--seed", "3")
        assert out.returncode == 0, out.stderr
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    out = run("inspect", str(a))
    assert out.returncode == 0 and "q5_1" in out.stdout and "gptj" in out.stdout


def test_inspect_rejects_a_bad_file_with_a_message(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"nope" * 10)
    out = run("inspect", str(bad))
    assert out.returncode == 1 and "magic" in out.stderr.lower()


def test_serve_refuses_an_invalid_registry_naming_the_field(tmp_path):
    reg = tmp_path / "r.yaml"
    reg.write_text("models:\n  - id: a\n    path: a.bin\n    workers: -1\n")
    out = run("serve", "--registry", str(reg), "--port", "0")
    assert out.returncode == 2
    assert str(reg) in out.stderr and "models[0] (id 'a')" in out.stderr and "'workers'" in out.stderr
