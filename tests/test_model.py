"""The model against Hugging Face transformers' own forward (Llama, Mistral and Qwen2 with sliding windows, Qwen3,
Mixtral, Qwen3-MoE): ``model(tokens)``, the chunked schedules and decode steps, at TP 1 and 2 over gloo; and with
every op on its Triton kernel."""

import json

import pytest
import torch

from iso_kernels import checkpoint, comm, launch, schedule
from iso_kernels.split import ChunkSplit

from helpers import HF_BATCH, HF_DECODE_STEPS, HF_SEQ_LEN

# even halves, a fraction, an index, four uneven chunks
SPLITS = [ChunkSplit.even(HF_SEQ_LEN), ChunkSplit.at(HF_SEQ_LEN, 0.3), ChunkSplit.at(HF_SEQ_LEN, 20),
          ChunkSplit((5, 16, 30, 37))]


def _run_family(rank, world_size, folder, tokens, sequence):
    """This rank's logits for: model(tokens), every split under both schedules, and teacher-forced decode."""
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size)
    model.setup_caches(HF_BATCH, HF_SEQ_LEN + HF_DECODE_STEPS)
    communicator = comm.make_communicator("torch") if world_size > 1 else None
    out = {}
    with torch.inference_mode():
        out["unsplit"] = model(tokens, comm=communicator)
        for split in SPLITS:
            for mode in schedule.SCHEDULES:
                out[(split.ends, mode)] = schedule.forward(model, tokens, communicator, split, schedule=mode)
        decode = []
        for position in range(HF_SEQ_LEN, HF_SEQ_LEN + HF_DECODE_STEPS):
            decode.append(schedule.forward(model, sequence[:, position:position + 1], communicator,
                                           start=position, all_logits=False))
        out["decode"] = torch.stack(decode, dim=1)
    return out


def _run_families(rank, world_size, runs):
    """{family: ``_run_family``'s logits} for every family of ``runs`` ({family: (folder, tokens, sequence)}): one
    launch of the ranks for all of them, which costs more than the families' runs."""
    return {family: _run_family(rank, world_size, *run) for family, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_matches_hugging_face(hf_checkpoints, world_size):
    runs = {family: (made["folder"], made["tokens"], made["sequence"]) for family, made in hf_checkpoints.items()}
    for rank, by_family in enumerate(launch.spawn_ranks(_run_families, world_size, args=(runs,), timeout_s=300)):
        for family, out in by_family.items():
            made, where = hf_checkpoints[family], f"{family} tp={world_size} rank={rank}"
            for key, logits in out.items():
                if key == "decode":
                    expected = made["decode_logits"]
                    # the greedy tokens HF chose are the argmax of our own decode logits too
                    assert torch.equal(logits[:, :-1].argmax(-1), made["sequence"][:, HF_SEQ_LEN + 1:]), where
                else:
                    expected = made["logits"]
                torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4, msg=f"{where} {key}")
            for split in SPLITS:
                assert torch.equal(out[(split.ends, "iso")], out[(split.ends, "serial")]), (where, split)


def test_forward_refuses_positions_beyond_the_caches(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    tokens = torch.randint(0, 512, (1, 8))
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(tokens)
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="beyond the 8"):
        model(tokens, start=1)


def test_triton_kernels_in_the_model_match_the_references(tiny_checkpoint, request):
    """The whole ISO prefill with every op on its Triton kernel (interpreted on CPU) against the CPU kernels."""
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    model.setup_caches(HF_BATCH, HF_SEQ_LEN)
    tokens = torch.randint(0, 512, (HF_BATCH, HF_SEQ_LEN))
    split = ChunkSplit.at(HF_SEQ_LEN, 0.4)
    with torch.inference_mode():
        expected = schedule.forward(model, tokens, None, split)
        request.getfixturevalue("triton_backend")
        got = schedule.forward(model, tokens, None, split)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_kv_heads_are_replicated_where_the_ranks_outnumber_them(hf_checkpoints):
    # 4 query and 2 KV heads over 4 ranks: each rank holds one query head and the KV head it reads.
    made = hf_checkpoints["qwen3"]
    for rank, out in enumerate(launch.spawn_ranks(_run_family, 4, args=(made["folder"], made["tokens"],
                                                                        made["sequence"]))):
        torch.testing.assert_close(out["unsplit"], made["logits"], atol=2e-5, rtol=1e-4, msg=f"rank {rank}")
        for split in SPLITS:
            assert torch.equal(out[(split.ends, "iso")], out[(split.ends, "serial")]), (rank, split)


# --- what the model does not implement: refused with the config field and its value ---
@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gemma2"), "model_type 'gemma2' is not supported"),
    (dict(model_type="qwen2_moe", shared_expert_intermediate_size=64), "model_type 'qwen2_moe' is not supported"),
    (dict(model_type="qwen3_moe", moe_intermediate_size=32, num_experts=4, shared_expert_intermediate_size=64),
     "shared_expert_intermediate_size 64 is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias True is not supported"),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=1,
          layer_types=["sliding_attention", "full_attention"]), "layer_types .* is not supported"),
])
def test_unsupported_configs_are_refused_with_the_field_and_its_value(changes, message, tmp_path, capsys):
    from iso_kernels import cli
    from iso_kernels.model import ModelArgs

    from helpers import HF_COMMON

    config = {**HF_COMMON, "model_type": "llama", **changes}
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_hf_config(config)
    (tmp_path / "config.json").write_text(json.dumps(config))  # refused before any rank starts
    assert cli.main(["prefill", "--model", str(tmp_path), "--tp", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: config.json:"), err


def test_qwen2_keeps_its_qkv_bias_and_a_supported_window_layout():
    from iso_kernels.model import ModelArgs

    from helpers import HF_COMMON

    args = ModelArgs.from_hf_config(dict(HF_COMMON, model_type="qwen2", use_sliding_window=True, sliding_window=16,
                                         max_window_layers=1, layer_types=["full_attention", "sliding_attention"]))
    assert args.qkv_bias and [args.window(i) for i in range(2)] == [0, 16]
    assert ModelArgs.from_hf_config(dict(HF_COMMON, model_type="qwen2", sliding_window=16)).window(1) == 0
