"""iso_kernels/models.py: one registry of named models, read by the engine (presets), the planner and the tables
(published shapes), torch-free."""

import json

import pytest

from iso_kernels import models
from iso_kernels.model import ModelArgs
from iso_kernels.planning import model_shape


@pytest.mark.parametrize("name", sorted({**models.PRESETS, **models.PUBLISHED}))
def test_every_registered_model_reads_the_same_as_a_model_and_as_a_shape(name):
    config = models.config(name)
    args = ModelArgs.from_hf_config(config)  # the engine's reading, with its refusals
    assert model_shape(config) == model_shape(args)
    assert json.loads(json.dumps(config)) == config  # a config.json could hold it


def test_published_shapes_are_the_checkpoints_sizes():
    # Parameter counts the model cards state: Llama-2-70B 69.0 B, Llama-3-70B 70.6 B, Qwen2.5-72B 72.7 B;
    # Qwen3-32B 32.8 B, Qwen3-30B-A3B 30.5 B, Qwen3-235B-A22B 235 B, Mixtral-8x22B 141 B (experts counted).
    for name, billions in (("llama2-70b", 69.0), ("llama3-70b", 70.6), ("qwen2.5-72b", 72.7), ("qwen3-32b", 32.8),
                           ("qwen3-30b-a3b", 30.5), ("qwen3-235b-a22b", 235.1), ("mixtral-8x22b", 140.6)):
        assert model_shape(models.config(name)).weight_bytes / 2 / 1e9 == pytest.approx(billions, rel=0.01)


def test_only_presets_run_and_unknown_names_are_refused_with_the_known_ones():
    assert models.config("llama-tiny", runnable=True)["hidden_size"] == 128
    with pytest.raises(ValueError, match="unknown model 'llama2-70b'; known: llama-1b, llama-small, llama-tiny"):
        models.config("llama2-70b", runnable=True)
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        models.config("gpt-5")


def test_read_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        models.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        models.read_config(tmp_path)
