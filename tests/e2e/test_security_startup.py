"""The real `serve` command refuses to start when a key setting holds no key or cannot be read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, free_port

REGISTRY = """
models:
  - id: succ
    path: {succ}
    prompt_template: plain
    workers: 1
"""


def serve(tmp_path, model_files, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m server serve ...` to its end (a refusal must end it at once)."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(REGISTRY.format(succ=model_files["succ"]))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPT4ALL_J_")}
    return subprocess.run(
        [sys.executable, "-m", "server", "serve", "--registry", str(registry), "--host", "127.0.0.1",
         "--port", str(free_port()), *args],
        cwd=ROOT, env={**environ, **(env or {})}, capture_output=True, text=True, timeout=30)


def keyfile(tmp_path, text: str):
    path = tmp_path / "keys.txt"
    path.write_text(text)
    return str(path)


CASES = {
    "flag with only separators": (lambda d: ["--api-keys", " , "], None,
                                  "--api-keys (GPT4ALL_J_API_KEYS) is set but holds no key"),
    "env with only separators": (lambda d: [], {"GPT4ALL_J_API_KEYS": ","}, "is set but holds no key"),
    "empty key file": (lambda d: ["--api-key-file", keyfile(d, "")], None, "holds no key"),
    "comments only": (lambda d: ["--api-key-file", keyfile(d, "# sk-commented-out\n\n")], None, "holds no key"),
    "missing key file": (lambda d: ["--api-key-file", str(d / "nope.txt")], None,
                         "cannot read the API key file {d}/nope.txt: No such file or directory"),
    "key file is a folder": (lambda d: ["--api-key-file", str(d)], None, "cannot read the API key file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auth_that_would_turn_itself_off_refuses_to_start(case, tmp_path, model_files):
    args, env, message = CASES[case]
    done = serve(tmp_path, model_files, *args(tmp_path), env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(d=tmp_path) in last, output
    assert "Traceback" not in output, output
