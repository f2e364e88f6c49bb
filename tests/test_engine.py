"""The reference transformer against Hugging Face transformers' own forward, and the ISO schedule against the
serial one, at TP 1, 2 and 4 over gloo."""

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from iso_kernels import checkpoint, comm, launch, schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SEQ_LEN = 37  # not a multiple of any block size
BATCH = 2
DECODE_STEPS = 3
SPLITS = [None, 0.3, 20, [5, 16, 30, 37]]  # even halves, a fraction, an index, four uneven chunks
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_parameters=LLAMA3_ROPE)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=64)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Each family saved with save_pretrained, with HF's logits for a prompt and its greedy continuation."""
    made = {}
    for seed, (family, (config_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)  # the same weights and prompt every run
        model = model_cls(config_cls(**COMMON, **extra)).eval()
        if family == "qwen2":
            assert model.config.tie_word_embeddings
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        tokens = torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ_LEN))
        with torch.no_grad():
            logits = model(tokens).logits
            sequence = tokens
            for _ in range(DECODE_STEPS):
                next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_token], dim=1)
            decode_logits = model(sequence).logits[:, SEQ_LEN:]
        made[family] = dict(folder=str(folder), tokens=tokens, logits=logits, sequence=sequence,
                            decode_logits=decode_logits)
    return made


def _run_family(rank, world_size, folder, tokens, sequence):
    """This rank's logits for: unsplit, every split under both schedules, and teacher-forced decode steps."""
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size)
    model.setup_caches(BATCH, SEQ_LEN + DECODE_STEPS)
    communicator = comm.make_communicator("torch") if world_size > 1 else None
    out = {}
    with torch.inference_mode():
        out["unsplit"] = model(tokens, comm=communicator)
        for split in SPLITS:
            bounds = schedule.chunk_bounds(SEQ_LEN, split)
            for mode in schedule.SCHEDULES:
                out[(str(split), mode)] = schedule.forward(model, tokens, communicator, bounds, schedule=mode)
        decode = []
        for position in range(SEQ_LEN, SEQ_LEN + DECODE_STEPS):
            decode.append(schedule.forward(model, sequence[:, position:position + 1], communicator,
                                           [(position, position + 1)], all_logits=False))
        out["decode"] = torch.stack(decode, dim=1)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_matches_hugging_face(hf_checkpoints, world_size):
    for family, made in hf_checkpoints.items():
        results = launch.spawn_ranks(_run_family, world_size,
                                     args=(made["folder"], made["tokens"], made["sequence"]))
        for rank, out in enumerate(results):
            where = f"{family} tp={world_size} rank={rank}"
            for key, logits in out.items():
                if key == "decode":
                    expected = made["decode_logits"]
                    # the greedy tokens HF chose are the argmax of our own decode logits too
                    assert torch.equal(logits[:, :-1].argmax(-1), made["sequence"][:, SEQ_LEN + 1:]), where
                else:
                    expected = made["logits"]
                torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4, msg=f"{where} {key}")
            for split in SPLITS:
                assert torch.equal(out[(str(split), "iso")], out[(str(split), "serial")]), (where, split)


def _iso_equals_serial(rank, world_size, folder, tokens, link):
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size)
    model.setup_caches(*tokens.shape)
    communicator = comm.make_communicator("torch", link=link)
    equal = []
    with torch.inference_mode():
        for split in SPLITS:
            bounds = schedule.chunk_bounds(tokens.shape[1], split)
            iso = schedule.forward(model, tokens, communicator, bounds, schedule="iso")
            serial = schedule.forward(model, tokens, communicator, bounds, schedule="serial")
            equal.append(torch.equal(iso, serial))
    return equal


@pytest.mark.parametrize("world_size", [2, 4])
def test_iso_is_bitwise_equal_to_serial_on_same_chunks(tmp_path, world_size):
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN))
    # A slow emulated link makes the ISO schedule really run ahead of the all-reduces it does not need yet, and
    # delivers each result only at wait(): reading a chunk's block output before waiting would see partial sums.
    link = comm.LinkModel("slow", latency_s=2e-3, bus_bandwidth=1e8)
    for rank_result in launch.spawn_ranks(_iso_equals_serial, world_size, args=(str(folder), tokens, link)):
        assert rank_result == [True] * len(SPLITS)


def test_tp_shards_reassemble(tmp_path):
    """The TP=2 pieces of every layer concatenate back to the checkpoint's own tensors: gate/up by rows,
    o/down by columns, and the fused qkv by whole heads, each rank holding its query heads, then its K heads,
    then its V heads."""
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    stored = safetensors.torch.load_file(folder / "model.safetensors")
    halves = [checkpoint.load_checkpoint(folder, rank=r, world_size=2) for r in range(2)]
    args = halves[0].args
    q_size, kv_size = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for i in range(args.n_layer):
        parts = [h.layers[i] for h in halves]
        hf = f"model.layers.{i}."
        for ours, theirs, dim in (("feed_forward.w1.weight", "mlp.gate_proj.weight", 0),
                                  ("feed_forward.w3.weight", "mlp.up_proj.weight", 0),
                                  ("feed_forward.w2.weight", "mlp.down_proj.weight", 1),
                                  ("attention.wo.weight", "self_attn.o_proj.weight", 1)):
            torch.testing.assert_close(torch.cat([p.get_parameter(ours) for p in parts], dim=dim),
                                       stored[hf + theirs], rtol=0, atol=0, msg=ours)
        pieces = [p.attention.wqkv.weight.split([q_size // 2, kv_size // 2, kv_size // 2]) for p in parts]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            torch.testing.assert_close(torch.cat([piece[j] for piece in pieces]),
                                       stored[f"{hf}self_attn.{name}.weight"], rtol=0, atol=0, msg=name)
        assert parts[0].attention.n_head == args.n_head // 2
        assert parts[0].attention.n_kv_heads == args.n_kv_heads // 2


def test_sharded_index_checkpoint_loads_like_single_file(tmp_path, hf_checkpoints):
    made = hf_checkpoints["llama"]
    model = transformers.LlamaForCausalLM.from_pretrained(made["folder"])
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = checkpoint.load_checkpoint(tmp_path, rank=1, world_size=2)
    single = checkpoint.load_checkpoint(made["folder"], rank=1, world_size=2)
    sharded, single = sharded.state_dict(), single.state_dict()
    assert sharded.keys() == single.keys()
    for name, tensor in single.items():
        assert torch.equal(sharded[name], tensor), name


def test_checkpoint_errors(tmp_path, hf_checkpoints):
    folder = tmp_path / "broken"
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_checkpoint(folder)
    folder.mkdir()
    config = json.loads((Path(hf_checkpoints["llama"]["folder"]) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint.load_checkpoint(folder)
    with pytest.raises(ValueError, match="KV heads"):
        checkpoint.load_checkpoint(hf_checkpoints["llama"]["folder"], world_size=4)
    # A config that disagrees with the weights: the shape check names the tensor.
    wrong = dict(config, intermediate_size=128)
    (folder / "config.json").write_text(json.dumps(wrong))
    os.symlink(os.path.join(hf_checkpoints["llama"]["folder"], "model.safetensors"), folder / "model.safetensors")
    with pytest.raises(ValueError, match="gate_proj"):
        checkpoint.load_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unreadable"):
        checkpoint.load_checkpoint(folder)


@pytest.mark.parametrize("seq_len, split, chunks, expected", [
    (10, None, 2, [(0, 5), (5, 10)]),
    (7, None, 3, [(0, 3), (3, 5), (5, 7)]),
    (10, 0.25, 2, [(0, 2), (2, 10)]),
    (10, 4, 2, [(0, 4), (4, 10)]),
    (10, [1, 9, 10], 2, [(0, 1), (1, 9), (9, 10)]),
])
def test_chunk_bounds(seq_len, split, chunks, expected):
    assert schedule.chunk_bounds(seq_len, split, chunks) == expected


@pytest.mark.parametrize("seq_len, split, chunks", [(3, None, 4), (10, 0, 2), (10, 10, 2), (10, 1.5, 2),
                                                    (10, [4, 3, 10], 2), (10, [4, 9], 2)])
def test_chunk_bounds_rejects(seq_len, split, chunks):
    with pytest.raises(ValueError, match="split|chunks"):
        schedule.chunk_bounds(seq_len, split, chunks)


def test_triton_kernels_in_the_model_match_the_references(tmp_path, request):
    """The whole ISO prefill with every op on its Triton kernel (interpreted on CPU) against the CPU kernels."""
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    model = checkpoint.load_checkpoint(folder)
    model.setup_caches(BATCH, SEQ_LEN)
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN))
    bounds = schedule.chunk_bounds(SEQ_LEN, 0.4)
    with torch.inference_mode():
        expected = schedule.forward(model, tokens, None, bounds)
        request.getfixturevalue("triton_backend")
        got = schedule.forward(model, tokens, None, bounds)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


class _FlagCheckingComm:
    """A TP=1 stand-in for a flag-triggered communicator: records each row group's flag at start time."""

    supports_ready_flag = True
    name = "flag-check"

    def __init__(self):
        self.starts = []

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        signal, index, target = ready_flag
        self.starts.append((signal[index].item(), target, tensor.shape[0]))
        return comm.PendingAllReduce(tensor)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_row_signal_all_reduces_start_per_finished_group(tmp_path, backend):
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    model = checkpoint.load_checkpoint(folder)
    model.setup_caches(BATCH, SEQ_LEN)
    tokens = torch.randint(0, 512, (BATCH, SEQ_LEN))
    bounds = schedule.chunk_bounds(SEQ_LEN, 0.5)
    flags = _FlagCheckingComm()
    with torch.inference_mode():
        plain = schedule.forward(model, tokens, None, bounds)
        signalled = schedule.forward(model, tokens, flags, bounds, row_signal_rows=16)
    torch.testing.assert_close(signalled, plain, atol=1e-5, rtol=1e-5)
    # 2 layers x 2 blocks x 2 chunks; a chunk of 2 x 18 or 2 x 19 rows is 3 groups of <= 16 rows
    assert len(flags.starts) == 2 * 2 * 2 * 3
    hidden = model.args.dim
    assert all(value == target == rows * hidden for value, target, rows in flags.starts)
