"""Serving batches: the paged KV cache (allocator, shared prefix pages), ragged requests packed in one stream
through the model and the schedules, chunks cut inside requests, cached prefixes, greedy decode from the pages;
ISO bitwise equal to serial on the same chunks at TP 1, 2 and 4 over gloo; and each request's logits against
Hugging Face's forward on that request alone (Llama, Mistral, Qwen2; TP 1 and 2)."""

import json
import os

import pytest
import torch

from iso_kernels import checkpoint, cli, comm, launch, models, schedule
from iso_kernels.batch import add_prompts, cache_prefix, greedy_decode
from iso_kernels.paged_cache import BlockAllocator, PackedBatch
from iso_kernels.split import ChunkSplit

# Ragged prompts computed from scratch, then two requests that continue one cached prefix (not a page multiple).
PROMPT_LENS = [1, 37, 91, 200]
PREFIX_LEN, SUFFIX_LENS = 40, [30, 25]
TOTAL = sum(PROMPT_LENS) + sum(SUFFIX_LENS)  # 384 tokens: requests at [0, 1, 38, 129, 329, 359, 384)
# Cuts inside the 200-token request (192), after the first request, inside the 91-token one (50), the 200-token
# one (250) and a cached-prefix one (340).
SPLITS = [ChunkSplit.even(TOTAL), ChunkSplit((1, 50, 250, 340, TOTAL))]
BLOCK_SIZE, NUM_BLOCKS, MAX_SEQ_LEN = 16, 64, 256
DECODE_STEPS = 2
VOCAB = models.PRESETS["llama-tiny"]["vocab_size"]


def _prompts(generator=None):
    """(the prompts, the shared prefix, the suffixes after it): 1-D token tensors."""
    def draw(n):
        return torch.randint(0, VOCAB, (n,), generator=generator)
    return [draw(n) for n in PROMPT_LENS], draw(PREFIX_LEN), [draw(n) for n in SUFFIX_LENS]


def _serve(model, cache, prompts, prefix, suffixes, communicator=None):
    """Prefill ``prefix`` as its own request, then add the batch: the prompts from scratch and the suffixes
    after the cached prefix. Returns (tokens, PackedBatch) of the batch."""
    owner = cache_prefix(model, cache, prefix, communicator)
    return add_prompts(cache, prompts + suffixes,
                       prefixes=[None] * len(prompts) + [(owner, PREFIX_LEN)] * len(suffixes))


def _packed_runs(model, communicator, prompts, prefix, suffixes):
    """Per-request logits of every split under both schedules and of model(tokens); then greedy decode steps
    from the pages the last prefill filled: {key: [(len_i, vocab), ...]}, "decode": (fed, logits)."""
    cache = model.setup_paged_caches(NUM_BLOCKS, MAX_SEQ_LEN, block_size=BLOCK_SIZE)
    out = {}
    with torch.inference_mode():
        tokens, batch = _serve(model, cache, prompts, prefix, suffixes, communicator)
        out["unsplit"] = batch.unpack(model(tokens, start=batch, comm=communicator)[0])
        for split in SPLITS:
            for mode in schedule.SCHEDULES:
                logits = schedule.forward(model, tokens, communicator, split, start=batch, schedule=mode)
                out[(split.ends, mode)] = [x.clone() for x in batch.unpack(logits[0])]
        first = torch.stack([x[-1] for x in out["unsplit"]]).argmax(-1)
        out["decode"] = greedy_decode(model, first, DECODE_STEPS, communicator, cache=cache, requests=batch.requests)
    return out


def _assert_iso_equals_serial(out, where):
    for split in SPLITS:
        for i, (iso, serial) in enumerate(zip(out[(split.ends, "iso")], out[(split.ends, "serial")], strict=True)):
            assert torch.equal(iso, serial), f"{where} split {split.ends} request {i}: ISO != serial"


# --- the paged cache's bookkeeping ---
def test_allocator_shares_and_frees_pages():
    pages = BlockAllocator(3)
    a, b = pages.allocate(), pages.allocate()
    assert (a, b, pages.num_free) == (0, 1, 1)
    pages.share(a)
    pages.release(a)
    assert pages.num_free == 1  # still held once
    pages.release(a)
    assert pages.num_free == 2 and pages.allocate() == a
    with pytest.raises(ValueError, match="already free"):
        pages.release(2)
    with pytest.raises(ValueError, match="only a page in use"):
        pages.share(2)
    pages.allocate()
    with pytest.raises(RuntimeError, match="all 3 are in use"):
        pages.allocate()


def test_prefix_requests_share_full_pages_and_copy_the_partial_one(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    cache = model.setup_paged_caches(8, 256, block_size=16)
    owner = cache.add_request()
    cache.append([owner], [40])  # pages 0, 1, 2 (8 tokens of page 2)
    for layer in cache.layers:
        layer.k.normal_()
        layer.v.normal_()
    child = cache.add_request(prefix_of=owner, prefix_len=37)
    assert cache.tables[child][:2] == cache.tables[owner][:2] and cache.tables[child][2] == 3
    assert cache.lengths[child] == 37 and cache.allocator.holders[:4] == [2, 2, 1, 1]
    for layer in cache.layers:
        assert torch.equal(layer.k[3], layer.k[2]) and torch.equal(layer.v[3], layer.v[2])
    batch = cache.append([child, owner], [5, 1])
    assert batch.starts == (37, 40) and batch.positions.tolist() == [37, 38, 39, 40, 41, 40]
    assert batch.slots.tolist() == [3 * 16 + 5, 3 * 16 + 6, 3 * 16 + 7, 3 * 16 + 8, 3 * 16 + 9, 2 * 16 + 8]
    cache.release(owner)
    assert cache.allocator.holders[:4] == [1, 1, 0, 1]
    with pytest.raises(RuntimeError, match="needs 6 more, 5 are free"):
        cache.append([child], [96])
    assert cache.lengths[child] == 42 and len(cache.tables[child]) == 3  # a refused append changes nothing
    with pytest.raises(ValueError, match="beyond the 256"):
        cache.append([child], [215])


def test_a_batch_holds_each_request_once_and_decode_of_no_steps_runs_nothing(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    cache = model.setup_paged_caches(4, 32)
    request = cache.add_request()
    with pytest.raises(ValueError, match="appear once"):
        cache.append([request, request], [1, 1])
    fed, logits = greedy_decode(model, torch.tensor([3]), 0, cache=cache, requests=[request])
    assert fed.shape == (1, 0) and logits.shape == (1, 0, VOCAB) and cache.lengths[request] == 0


def test_slicing_a_packed_batch_cuts_requests_at_token_indices():
    batch = PackedBatch((3, 5, 2), (0, 10, 4), ((0,), (1,), (2,)), 16, requests=(7, 8, 9))
    assert batch.cu_seqlens == (0, 3, 8, 10) and batch.last_rows == [2, 7, 9] and batch.max_end == 15
    part = batch.slice(2, 7)  # the last token of request 7, the first four of request 8
    assert (part.q_lens, part.starts, part.requests) == ((1, 4), (2, 10), (7, 8))
    assert part.seqused_k.tolist() == [3, 14] and part.positions.tolist() == [2, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="cannot hold 17"):
        PackedBatch((3,), (14,), ((0,),), 16)


def test_packed_batches_need_the_paged_caches(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    model.setup_caches(1, 16)
    batch = PackedBatch((4,), (0,), ((0,),), 16)
    with pytest.raises(ValueError, match="setup_paged_caches"):
        model(torch.zeros(1, 4, dtype=torch.long), start=batch)
    model.setup_paged_caches(4, 16)
    with pytest.raises(ValueError, match="setup_paged_caches"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(1, 4\)"):
        model(torch.zeros(2, 4, dtype=torch.long), start=batch)


# --- the packed model at TP=1: against each request run alone, cached prefixes, decode ---
def test_packed_requests_match_each_request_alone(tiny_checkpoint):
    """Every split and schedule of the ragged batch against the contiguous-cache model on each full prompt
    (a cached-prefix request: its prefix + suffix, from scratch), and greedy decode against the same."""
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    prompts, prefix, suffixes = _prompts()
    out = _packed_runs(model, None, prompts, prefix, suffixes)
    full_prompts = prompts + [torch.cat([prefix, s]) for s in suffixes]
    fed, decode_logits = out["decode"]
    with torch.inference_mode():
        for i, full in enumerate(full_prompts):
            model.setup_caches(1, len(full) + DECODE_STEPS)
            alone = model(full[None])[0, -len(out["unsplit"][i]):]
            steps = [model(fed[i, j].view(1, 1), start=len(full) + j)[0, -1] for j in range(DECODE_STEPS)]
            for key, logits in out.items():
                if key != "decode":
                    torch.testing.assert_close(logits[i], alone, atol=2e-5, rtol=1e-4, msg=f"{key} request {i}")
            torch.testing.assert_close(decode_logits[i], torch.stack(steps), atol=2e-5, rtol=1e-4)
            assert fed[i, 0] == alone[-1].argmax() and fed[i, 1] == steps[0].argmax()
    _assert_iso_equals_serial(out, "tp=1")


def test_last_logits_of_a_packed_batch_are_each_requests_last_row(tiny_checkpoint):
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    cache = model.setup_paged_caches(NUM_BLOCKS, MAX_SEQ_LEN, block_size=BLOCK_SIZE)
    prompts, prefix, suffixes = _prompts()
    with torch.inference_mode():
        tokens, batch = _serve(model, cache, prompts, prefix, suffixes)
        every = schedule.forward(model, tokens, None, SPLITS[1], start=batch)
        last = schedule.forward(model, tokens, None, SPLITS[1], start=batch, all_logits=False)
    assert last.shape == (len(batch.q_lens), VOCAB)
    torch.testing.assert_close(last, every[0, batch.last_rows], atol=1e-6, rtol=1e-6)


def test_triton_kernels_on_a_packed_batch_match_the_cpu_kernels(tiny_checkpoint, request):
    """A small packed ISO prefill (a cut inside a request, a cached prefix) with every op on its Triton kernel
    (interpreted on CPU) against the CPU kernels."""
    model = checkpoint.load_checkpoint(tiny_checkpoint)
    prompts, prefix, suffixes = [torch.randint(0, VOCAB, (n,)) for n in (1, 21)], torch.randint(0, VOCAB, (18,)), \
        [torch.randint(0, VOCAB, (5,))]
    split = ChunkSplit((12, 27))
    results = []
    for backend in ("torch", "triton"):
        if backend == "triton":
            request.getfixturevalue("triton_backend")
        cache = model.setup_paged_caches(8, 64, block_size=16)
        with torch.inference_mode():
            owner = cache_prefix(model, cache, prefix)
            tokens, batch = add_prompts(cache, prompts + suffixes, prefixes=[None, None, (owner, 18)])
            results.append(schedule.forward(model, tokens, None, split, start=batch))
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)


# As in test_schedule: a slow emulated link lets ISO run ahead of the all-reduces it does not need yet, and
# delivers each result only at wait(), so reading a block output before waiting would see partial sums.
SLOW_LINK = comm.LinkModel("slow", latency_s=2e-3, bus_bandwidth=1e8)


def _one_thread_per_rank(world_size):
    """Ranks share the dev machine's 2 cores: more threads than cores only slow them down."""
    if world_size > 1:
        torch.set_num_threads(1)


# --- ISO == serial over gloo at TP 4 (TP 1 and 2: the Hugging Face test) ---
def _iso_equals_serial(rank, world_size, folder, prompts, prefix, suffixes, link):
    _one_thread_per_rank(world_size)
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size)
    communicator = comm.make_communicator("torch", link=link)
    cache = model.setup_paged_caches(NUM_BLOCKS, MAX_SEQ_LEN, block_size=BLOCK_SIZE)
    equal = []
    with torch.inference_mode():
        tokens, batch = _serve(model, cache, prompts, prefix, suffixes, communicator)
        for split in SPLITS:
            iso = schedule.forward(model, tokens, communicator, split, start=batch, schedule="iso")
            serial = schedule.forward(model, tokens, communicator, split, start=batch, schedule="serial")
            equal.append(torch.equal(iso, serial))
    return equal


@pytest.mark.slow
def test_packed_iso_is_bitwise_equal_to_serial_on_same_chunks_at_tp4(tiny_checkpoint):
    results = launch.spawn_ranks(_iso_equals_serial, 4, args=(str(tiny_checkpoint), *_prompts(), SLOW_LINK))
    for rank_result in results:
        assert rank_result == [True] * len(SPLITS)


# --- against Hugging Face: every request alone, Llama, Mistral, Qwen2 at the llama-tiny shapes ---
@pytest.fixture(scope="module")
def hf_serving(tmp_path_factory):
    """Per family: a save_pretrained folder, the batch's prompts, and HF's logits of each request's new tokens
    (its whole prompt, prefix included, run alone) and of its greedy decode steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    shapes = dict(models.PRESETS["llama-tiny"])
    families = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                  dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                        "rope_theta": 500000.0})),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                    dict(sliding_window=shapes["max_position_embeddings"])),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    }
    made = {}
    for seed, (family, (config_cls, model_cls, extra)) in enumerate(families.items()):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**shapes, **extra)).eval()
        folder = tmp_path_factory.mktemp(f"serving-{family}")
        model.save_pretrained(folder)
        prompts, prefix, suffixes = _prompts(torch.Generator().manual_seed(seed))
        requests = [(p, p) for p in prompts] + [(torch.cat([prefix, s]), s) for s in suffixes]
        with torch.no_grad():
            made[family] = dict(folder=str(folder), inputs=(prompts, prefix, suffixes),
                                expected=[_hf_request(model, full, len(new)) for full, new in requests])
    return made


def _hf_request(model, full, n_new):
    """HF's logits of the last ``n_new`` tokens of ``full`` alone, its greedy tokens after them, and their logits."""
    sequence = full[None]
    for _ in range(DECODE_STEPS):
        next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    logits = model(sequence).logits[0]
    prompt_end = len(full)
    return dict(logits=logits[prompt_end - n_new:prompt_end], greedy=sequence[0, prompt_end:],
                decode_logits=logits[prompt_end:])


def _hf_families_runs(rank, world_size, families):
    """{family: _packed_runs} of this rank, every family in one launch (each launch costs seconds)."""
    _one_thread_per_rank(world_size)
    communicator = comm.make_communicator("torch", link=SLOW_LINK) if world_size > 1 else None
    return {family: _packed_runs(checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size),
                                 communicator, *inputs)
            for family, (folder, inputs) in families.items()}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_packed_requests_match_hugging_face(hf_serving, world_size):
    families = {family: (made["folder"], made["inputs"]) for family, made in hf_serving.items()}
    if world_size == 1:
        results = [_hf_families_runs(0, 1, families)]
    else:
        results = launch.spawn_ranks(_hf_families_runs, world_size, args=(families,))
    for rank, per_family in enumerate(results):
        for family, out in per_family.items():
            made, where = hf_serving[family], f"{family} tp={world_size} rank={rank}"
            fed, decode_logits = out.pop("decode")
            for i, expected in enumerate(made["expected"]):
                for key, logits in out.items():
                    torch.testing.assert_close(logits[i], expected["logits"], atol=2e-5, rtol=1e-4,
                                               msg=f"{where} {key} request {i}")
                assert torch.equal(fed[i], expected["greedy"]), f"{where} request {i}: greedy tokens"
                torch.testing.assert_close(decode_logits[i], expected["decode_logits"], atol=2e-5, rtol=1e-4,
                                           msg=f"{where} decode request {i}")
            _assert_iso_equals_serial(out, where)


# --- the CLI on a ragged batch ---
@pytest.mark.slow
def test_cli_ragged_tokens_match_hugging_face_per_request(hf_serving, tmp_path):
    """``prefill --tokens ragged.json --save-logits`` (TP 2, the split trial's chunks, which cut requests):
    each request's saved logits, serial and ISO, are HF's on that request alone; generated tokens are HF's."""
    made = hf_serving["llama"]
    prompts = made["inputs"][0]
    (tmp_path / "ragged.json").write_text(json.dumps([p.tolist() for p in prompts]))
    report_path, logits_path = tmp_path / "report.json", tmp_path / "logits.pt"
    assert cli.main(["prefill", "--model", made["folder"], "--tokens", str(tmp_path / "ragged.json"), "--tp", "2",
                     "--link", "ratio:1.0", "--chunks", "3", "--block-size", "32", "--repeats", "1",
                     "--warmup", "0", "--generate", str(DECODE_STEPS), "--comm-backend", "torch",
                     "--json", str(report_path), "--save-logits", str(logits_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["batch"] == len(PROMPT_LENS) and report["seq_len"] == sum(PROMPT_LENS)
    assert [r["new_tokens"] for r in report["requests"]] == PROMPT_LENS
    assert any(len(r["chunks"]) > 1 for r in report["requests"])  # a request straddles a cut
    assert report["iso_equals_serial_same_chunks"] and report["agree"]
    saved = torch.load(logits_path)
    for mode in ("serial", "iso"):
        assert [x.shape for x in saved[mode]] == [(n, VOCAB) for n in PROMPT_LENS]
        for i, expected in enumerate(made["expected"][:len(prompts)]):
            torch.testing.assert_close(saved[mode][i], expected["logits"], atol=2e-5, rtol=1e-4,
                                       msg=f"{mode} request {i}")
    assert report["generated"] == [e["greedy"].tolist() for e in made["expected"][:len(prompts)]]


@pytest.mark.slow
def test_cli_cached_prefix_and_random_prompt_lens(tmp_path):
    report_path = tmp_path / "report.json"
    assert cli.main(["prefill", "--model", "llama-tiny", "--prompt-lens", "30,7,50", "--cached-prefix", "20",
                     "--tp", "2", "--split", "0.5", "--repeats", "1", "--warmup", "0", "--generate", "2",
                     "--comm-backend", "torch", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert [(r["cached_prefix"], r["new_tokens"], r["stream"]) for r in report["requests"]] == [
        (20, 30, [0, 30]), (20, 7, [30, 37]), (20, 50, [37, 87])]
    assert report["bounds"] == [[0, 44], [44, 87]] and report["requests"][2]["chunks"] == [0, 1]
    assert report["iso_equals_serial_same_chunks"] and report["agree"]
    assert [len(g) for g in report["generated"]] == [2, 2, 2]


@pytest.mark.parametrize("options, message", [
    (["--prompt-lens", "3,x"], "--prompt-lens"), (["--prompt-lens", "3,0"], ">= 1"),
    (["--cached-prefix", "-1", "--prompt-lens", "3"], "--cached-prefix"),
    (["--block-size", "24", "--prompt-lens", "3"], "--block-size"),
    (["--cached-prefix", "500", "--prompt-lens", "10"], "positions"),
])
def test_cli_rejects_bad_serving_options(options, message, capsys):
    assert cli.main(["prefill", "--model", "llama-tiny", *options]) == 2
    assert message in capsys.readouterr().err
