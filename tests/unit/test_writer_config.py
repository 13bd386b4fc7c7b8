"""GPTJConfig.check: every invalid hyperparameter is a ConfigError naming its field, before any write."""

from __future__ import annotations

import pytest

from backends.ggml.writer import ConfigError, GPTJConfig, write_model


@pytest.mark.parametrize("changes,field,text", [
    ({"n_embd": 65}, "n_embd", "multiple of n_head (4), got 65"),
    ({"n_layer": 0}, "n_layer", "n_layer must be a positive integer, got 0"),
    ({"n_head": 0}, "n_head", "n_head must be a positive integer, got 0"),
    ({"n_ctx": -1}, "n_ctx", "n_ctx must be a positive integer, got -1"),
    ({"n_vocab": 10}, "n_vocab", "n_vocab must be >= 300"),
    ({"n_embd": 48, "n_head": 4}, "n_embd", "multiple of 32 with the quantized ftype q4_0"),
    ({"n_rot": 7}, "n_rot", "n_rot must be even and in [0, 16]"),
    ({"n_rot": -2}, "n_rot", "n_rot must be even"),
    ({"ftype": "q3_k"}, "ftype", "unknown ftype 'q3_k'"),
    ({"n_embd": 64.0}, "n_embd", "positive integer, got 64.0"),
])
def test_check_names_the_field(changes, field, text):
    config = GPTJConfig(**{"n_vocab": 512, **changes})
    with pytest.raises(ConfigError) as err:
        config.check()
    assert err.value.field == field and text in str(err.value), str(err.value)
    assert isinstance(err.value, ValueError)


def test_valid_configs_pass():
    assert GPTJConfig(n_vocab=512).check() == GPTJConfig(n_vocab=512).check(legacy=True)  # q4_0 both
    GPTJConfig(n_vocab=300, n_embd=48, n_head=4, n_rot=12, ftype="f16").check()  # unquantized: any width


def test_write_model_refuses_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="n_layer"):
        write_model(tmp_path / "m.bin", GPTJConfig(n_vocab=512, n_layer=0))
    assert list(tmp_path.iterdir()) == []


def test_successor_margin_names_n_embd(tmp_path):
    config = GPTJConfig(n_vocab=512, n_embd=8, n_head=1, n_rot=8, ftype="f32")
    with pytest.raises(ConfigError) as err:
        write_model(tmp_path / "m.bin", config, kind="successor")
    assert err.value.field == "n_embd" and "use a larger n_embd" in str(err.value)
