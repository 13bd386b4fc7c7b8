"""The command line's edges: --version, settings errors from flags and env vars, make-model's input
checks and output rules, and `pull` without a network."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import backends.download as dl
from server.cli import _describe_setting_error, main, version

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


# --- --version ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--version"], ["serve", "--version"]])
def test_version_prints_the_installed_version(args):
    from importlib.metadata import version as dist_version

    out = cli(*args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"gpt4all-j-server {dist_version('gpt4all-j-server')}"
    assert version() == dist_version("gpt4all-j-server")


# --- settings errors ----------------------------------------------------------------------------------


def test_bad_flag_value_is_a_one_line_error_naming_the_flag():
    out = cli("--port", "70000", "--registry", "/nonexistent/registry.yaml")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: invalid --port 70000: input should be less than or equal to 65535"


def test_bad_env_value_names_the_variable_and_the_flag():
    out = cli("serve", env={"GPT4ALL_J_QUEUE_TIMEOUT": "soon", "GPT4ALL_J_LOG_FORMAT": "xml"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: invalid GPT4ALL_J_") for line in lines), lines
    assert "GPT4ALL_J_QUEUE_TIMEOUT=soon (environment variable; the flag is --queue-timeout)" in lines[0]
    assert "GPT4ALL_J_LOG_FORMAT=xml" in lines[1] and "'text' or 'json'" in lines[1]


def test_secret_values_are_never_echoed():
    error = {"loc": ("api_keys",), "msg": "Value error, no usable key", "input": "s3cret"}
    text = _describe_setting_error(error, {"api_keys": "s3cret"})
    assert text == "invalid --api-keys (hidden): no usable key"
    error = {"loc": (), "msg": "Value error, bad combination", "input": {}}
    assert _describe_setting_error(error, {}) == "invalid settings: bad combination"


# --- make-model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--n-embd", "65"], "error: --n-embd must be a multiple of --n-head (4), got 65"),
    (["--n-layer", "0"], "error: --n-layer must be a positive integer, got 0"),
    (["--n-vocab", "10"], "error: --n-vocab must be >= 300"),
    (["--n-embd", "48"], "error: --n-embd must be a multiple of 32 with the quantized --ftype q4_0"),
    (["--n-rot", "9"], "error: --n-rot must be even and in [0, 16]"),
    (["--kind", "successor", "--n-embd", "8", "--n-head", "1", "--ftype", "f32"],
     "error: --n-embd 8 is too small for a successor model of 512 tokens"),
    (["--kind", "demo", "--n-layer", "3"], "error: --n-layer: the demo model's sizes are fixed"),
])
def test_make_model_bad_input_is_an_error_not_a_traceback(tmp_path, capsys, args, message):
    out = tmp_path / "m.bin"
    assert main(["make-model", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert list(tmp_path.iterdir()) == []


def test_make_model_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "m.bin"
    out.write_bytes(b"keep me")
    assert main(["make-model", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} already exists; use --force to replace it\n"
    assert out.read_bytes() == b"keep me"
    assert main(["make-model", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"lmgg"  # GGML magic, little-endian


def test_make_model_does_not_create_folders(tmp_path, capsys):
    assert main(["make-model", str(tmp_path / "missing" / "m.bin")]) == 2
    assert f"{tmp_path / 'missing'} does not exist; create the folder first" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    assert main(["make-model", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_make_model_help_describes_every_option_with_its_default(capsys):
    from server.cli import build_parser

    parser = build_parser()
    make = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "make-model")[1]
    options = [a for a in make._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer", "n_rot", "ftype",
                                         "seed", "kind", "force"}
    for action in options:
        assert action.help and "default" in action.help, action.dest
    with pytest.raises(SystemExit) as done:
        main(["make-model", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("(default 512)", "(default 64)", "(default q4_0)", "(default random)", "(default 0)",
                     "out the file to write; its folder must exist", "--force replace OUT if it exists"):
        assert expected in text, expected


# --- pull without a network ---------------------------------------------------------------------------


@pytest.fixture
def offline_registry(tmp_path, monkeypatch) -> tuple[Path, list[float]]:
    def fail(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    sleeps: list[float] = []
    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(dl.time, "sleep", sleeps.append)
    reg = tmp_path / "reg.yaml"
    reg.write_text(json.dumps({"models": [{"id": "tiny", "path": "models/m.bin",
                                           "url": "http://models.example.invalid/m.bin"}]}))
    return reg, sleeps


def test_pull_offline_fails_at_once_with_a_clear_message(offline_registry, tmp_path, capsys):
    reg, sleeps = offline_registry
    assert main(["pull", "tiny", "--registry", str(reg)]) == 1
    err = capsys.readouterr().err
    assert "cannot resolve host models.example.invalid (no network or DNS?)" in err, err
    assert sleeps == [] and "retrying" not in err
    assert ".part" not in err and not (tmp_path / "models" / "m.bin.part").exists()


def test_pull_interrupted_before_any_byte_mentions_no_part(offline_registry, tmp_path, capsys, monkeypatch):
    reg, _ = offline_registry

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(socket, "getaddrinfo", interrupt)
    assert main(["pull", "tiny", "--registry", str(reg)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; nothing was downloaded" in err and ".part" not in err, err


def test_argparse_types_refuse_bad_pull_numbers(capsys):
    for args in (["--timeout", "0"], ["--retries", "-1"], ["--retry-wait", "nan"]):
        with pytest.raises(SystemExit) as done:
            main(["pull", "x", *args])
        assert done.value.code == 2
        assert f"argument {args[0]}: must be" in capsys.readouterr().err


def test_serve_namespace_without_flags_gives_default_settings():
    from server.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve"])
    assert isinstance(args, argparse.Namespace) and settings_from_args(args).port == 4891
