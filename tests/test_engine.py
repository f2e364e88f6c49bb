"""iso_kernels/engine.py without ranks: what ``resolve`` checks before any rank starts, and the split the user
asked for. Whole jobs run in tests/test_cli.py (through the CLI) and tests/test_packed_batch.py."""

import pytest
import torch

from iso_kernels import engine
from iso_kernels.split import ChunkSplit


def test_resolve_fills_in_the_defaults_and_the_users_split():
    job = engine.resolve(engine.PrefillConfig(model="llama-tiny", seq_len=100, split=0.25, device="cpu"))
    assert (job.device, job.dtype, job.args.dim) == ("cpu", torch.float32, 128)
    assert job.split == ChunkSplit((25, 100))
    assert engine.resolve(engine.PrefillConfig(model="llama-tiny", seq_len=100, device="cpu")).split is None


@pytest.mark.parametrize(("changes", "message"), [
    (dict(tp=0), "--tp must be >= 1"),
    (dict(tp=3), "not divisible by tp=3"),
    (dict(mode="fast"), "--mode must be serial, iso or both"),
    (dict(seq_len=600), "exceeds the model's 512 positions"),
    (dict(split=100), "--split 100 is outside the prompt"),
    (dict(split=0.5, chunks=3), "--split INDEX|FRACTION gives two chunks"),
    (dict(chunks=0), "--chunks must be >= 1"),
    (dict(prompt_lens=[10, 0]), "--seq-len and --prompt-lens must be >= 1"),
    (dict(block_size=24), "--block-size must be a power of two"),
    (dict(tokens=torch.tensor([[1, 600]])), r"--tokens: ids must lie in \[0, 512\)"),
])
def test_resolve_refuses_what_cannot_run_with_the_option_named(changes, message):
    cfg = engine.PrefillConfig(**{"model": "llama-tiny", "seq_len": 100, "device": "cpu", **changes})
    with pytest.raises(ValueError, match=message):
        engine.resolve(cfg)


def test_a_serving_batch_is_split_over_its_whole_stream():
    cfg = engine.PrefillConfig(model="llama-tiny", prompt_lens=[30, 50], split=60, device="cpu")
    assert engine.request_lens(cfg) == [30, 50]
    assert engine.resolve(cfg).split == ChunkSplit((60, 80))
