"""Registry validation: errors name the file, the entry and the field."""

from pathlib import Path

import pytest

from backends.registry import RegistryError, load_registry_file, resolve
from tests.models import write_successor

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "reg.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,expected", [
    ("models:\n  - id: a\n    path: a.bin\n    colour: red\n", ["models[0] (id 'a')", "'colour'", "Extra inputs"]),
    ("models:\n  - id: a\n    path: a.bin\n    workers: many\n", ["models[0] (id 'a')", "'workers'"]),
    ("models:\n  - id: a\n    path: a.bin\n  - id: a\n    path: b.bin\n", ["models[1] (id 'a')", "'id'", "already used"]),
    ("models:\n  - id: a\n    path: a.bin\n  - id: b\n    aliases: [a]\n    path: b.bin\n", ["models[1] (id 'b')", "'aliases'"]),
    ("models:\n  - id: a\n    path: a.bin\n    prompt_template: nope\n", ["'prompt_template'", "unknown template"]),
    ("models:\n  - path: a.bin\n", ["models[0]", "'id'", "Field required"]),
    ("models: []\n", ["models"]),
    ("models:\n  - id: a\n    path: a.bin\n    sampling: {temperature: 5}\n", ["'sampling.temperature'"]),
    ("{not yaml", ["not valid YAML"]),
])
def test_errors_name_file_entry_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RegistryError) as err:
        load_registry_file(path)
    message = str(err.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_missing_and_bad_files_are_skipped_with_reasons(tmp_path):
    write_successor(tmp_path / "good.bin")
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + b"\0" * 100)
    path = write(tmp_path, "models:\n"
                 "  - {id: good, path: good.bin, prompt_template: plain}\n"
                 "  - {id: gone, path: gone.bin, url: 'http://example.invalid/x.bin'}\n"
                 "  - {id: bad, path: bad.bin}\n")
    reg = resolve(path)
    assert [m.spec.id for m in reg.served] == ["good"]
    assert "missing" in reg.skipped["gone"] and "gpt4all-j-server pull gone" in reg.skipped["gone"]
    assert "bad" in reg.skipped
    assert reg.served[0].info.n_vocab == 320


def test_context_length_above_the_file_is_an_error(tmp_path):
    write_successor(tmp_path / "good.bin", n_ctx=256)
    path = write(tmp_path, "models:\n  - {id: good, path: good.bin, context_length: 4096}\n")
    with pytest.raises(RegistryError, match="'context_length'.*exceeds the file's n_ctx of 256"):
        resolve(path)


def test_bundled_registry_is_valid_and_lists_the_gpt4all_j_releases():
    parsed = load_registry_file(ROOT / "model_registry.yaml")
    ids = [m.id for m in parsed.models]
    for release in ("v1.3-groovy", "v1.2-jazzy", "v1.1-breezy"):
        assert any(release in i for i in ids)
    assert "demo" in ids


def test_demo_model_is_written_when_missing(tmp_path):
    path = write(tmp_path, "models:\n  - {id: demo, path: m/demo.bin, create_if_missing: demo}\n")
    reg = resolve(path)
    assert [m.spec.id for m in reg.served] == ["demo"] and (tmp_path / "m/demo.bin").is_file()


def test_engine_threads_entry_then_setting_then_cpus_per_worker(monkeypatch):
    from backends import registry
    from backends.registry import ModelSpec, engine_threads

    monkeypatch.setattr(registry, "usable_cpus", lambda: 8)
    assert engine_threads(ModelSpec(id="a", path="a.bin", threads=3), default=2) == 3
    assert engine_threads(ModelSpec(id="a", path="a.bin"), default=2) == 2
    assert engine_threads(ModelSpec(id="a", path="a.bin", workers=2)) == 4
    assert engine_threads(ModelSpec(id="a", path="a.bin", workers=16)) == 1


def test_resolved_threads_reach_the_served_model(tmp_path):
    write_successor(tmp_path / "m.bin")
    reg = resolve(write(tmp_path, "models:\n  - {id: m, path: m.bin}\n"), default_threads=3)
    assert reg.served[0].threads == 3


def test_a_legacy_file_is_skipped_with_a_command_that_converts_it_in_place(tmp_path):
    import os
    import shlex
    import subprocess
    import sys

    from backends.ggml.writer import GPTJConfig, write_model

    config = GPTJConfig(n_vocab=300, n_ctx=32, n_embd=32, n_head=2, n_layer=1, n_rot=4, ftype="q4_0")
    write_model(tmp_path / "old.bin", config, seed=0, legacy=True)
    reg = resolve(write(tmp_path, "models:\n  - {id: old, path: old.bin, url: http://127.0.0.1:9/o.bin, md5: '"
                                  + "0" * 32 + "'}\n"))
    reason = reg.skipped["old"]
    assert "legacy pre-May-2023" in reason and "gpt4all-j-server pull old --registry" in reason
    command = reason.split("in place, with: ", 1)[1].split(" (or:", 1)[0]
    assert shlex.split(command)[:2] == ["gpt4all-j-server", "convert"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert resolve(tmp_path / "reg.yaml").served[0].spec.id == "old"  # served from the same path now


def test_a_registry_template_can_set_the_tool_calling_fields(tmp_path):
    """Templates are data: the tool block, call and result formats come from the registry when given."""
    from backends.registry import load_registry_file, template_for

    path = tmp_path / "r.yaml"
    path.write_text('templates:\n  t: {user: "U:{content}\\n", tool_marker: "CALL>", tool_result: "R[{name}]:{content}\\n"}\n'
                    "models:\n  - {id: m, path: m.bin, prompt_template: t}\n")
    t = template_for(load_registry_file(path), "t")
    assert (t.tool_marker, t.user) == ("CALL>", "U:{content}\n")
    assert t.render([("tool", "42", "add")]).startswith("R[add]:42")
    assert t.tool_call == "{marker}{calls}"  # not set: the built-in default
