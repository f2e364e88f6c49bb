"""The real overlap paths on one GPU (@gpu): NCCL runs a one-rank communicator, which takes the whole stream,
event and flag path of a tensor-parallel group. In one spawned rank, each case runs ``schedule.forward`` on
llama-tiny: ISO against serial over the same chunks, bit for bit, with a world-1 ``NcclExtCommunicator``
(plain, row-signalled, and on a packed batch whose chunk cut straddles a request) and with torch's NCCL
backend; and an ISO prefill captured into a CUDA graph, replayed twice with the tokens changed in place,
against eager runs (row-signal counters are zeroed inside the graph). No flag wait may time out: every case
settles its communicator, which raises a timed-out wait."""

import traceback

import pytest
import torch

from iso_kernels import checkpoint, launch

SEQ_LEN, BATCH = 300, 2
SPLIT_ENDS = (100, 211, SEQ_LEN)  # not multiples of any tile
ROW_SIGNAL_ROWS = 32
PACKED_LENS, PACKED_ENDS = (70, 130, 41), (90, 241)  # the cut at 90 falls inside the second request
CASES = ("nccl_ext", "nccl_ext_row_signal", "nccl_ext_packed", "torch_nccl", "graph_capture",
         "graph_capture_row_signal")


def _model(folder):
    model = checkpoint.load_checkpoint(folder, device="cuda")
    model.setup_caches(BATCH, SEQ_LEN)
    return model


def _iso_and_serial(model, communicator, tokens, split, **kwargs):
    from iso_kernels import schedule

    iso = schedule.forward(model, tokens, communicator, split, schedule="iso", **kwargs)
    serial = schedule.forward(model, tokens, communicator, split, schedule="serial", **kwargs)
    schedule.settle(communicator)
    return iso, serial


def _assert_iso_equals_serial(iso, serial):
    assert torch.equal(iso, serial), f"max |iso - serial| = {(iso - serial).abs().max().item()}"


def _case_nccl_ext(folder, communicator, row_signal_rows=None):
    from iso_kernels.split import ChunkSplit

    model = _model(folder)
    tokens = torch.randint(0, model.args.vocab_size, (BATCH, SEQ_LEN), device="cuda")
    _assert_iso_equals_serial(*_iso_and_serial(model, communicator, tokens, ChunkSplit(SPLIT_ENDS),
                                               row_signal_rows=row_signal_rows))


def _case_nccl_ext_row_signal(folder, communicator):
    _case_nccl_ext(folder, communicator, ROW_SIGNAL_ROWS)


def _case_nccl_ext_packed(folder, communicator):
    from iso_kernels.batch import add_prompts
    from iso_kernels.split import ChunkSplit

    model = checkpoint.load_checkpoint(folder, device="cuda")
    cache = model.setup_paged_caches(32, 256, block_size=16)
    prompts = [torch.randint(0, model.args.vocab_size, (n,), device="cuda") for n in PACKED_LENS]
    tokens, batch = add_prompts(cache, prompts)
    _assert_iso_equals_serial(*_iso_and_serial(model, communicator, tokens,
                                               ChunkSplit((*PACKED_ENDS, sum(PACKED_LENS))), start=batch))


def _case_torch_nccl(folder, communicator):
    from iso_kernels.comm import TorchCommunicator

    _case_nccl_ext(folder, TorchCommunicator())


def _case_graph_capture(folder, communicator, row_signal_rows=None):
    from iso_kernels import schedule
    from iso_kernels.split import ChunkSplit

    model, split = _model(folder), ChunkSplit(SPLIT_ENDS)

    def prefill(tokens):
        return schedule.forward(model, tokens, communicator, split, row_signal_rows=row_signal_rows)

    draws = [torch.randint(0, model.args.vocab_size, (BATCH, SEQ_LEN), device="cuda") for _ in range(3)]
    eager = [prefill(tokens).clone() for tokens in draws]  # also compiles, tunes and warms every kernel
    schedule.settle(communicator)
    static_tokens = draws[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = prefill(static_tokens)
    for tokens, expected in zip(draws, eager, strict=True):
        static_tokens.copy_(tokens)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_logits, expected), f"max diff {(static_logits - expected).abs().max().item()}"
    schedule.settle(communicator)


def _case_graph_capture_row_signal(folder, communicator):
    _case_graph_capture(folder, communicator, ROW_SIGNAL_ROWS)


def _run_cases(rank, world_size, folder):
    from iso_kernels.comm import NcclExtCommunicator

    outcomes = {}
    with torch.inference_mode():
        for case in CASES:
            torch.manual_seed(0)
            try:
                with NcclExtCommunicator() as communicator:  # one per case: a sticky failure stays in its case
                    globals()[f"_case_{case}"](folder, communicator)
                outcomes[case] = None
            except Exception:  # noqa: BLE001 - reported per case by the parent
                outcomes[case] = traceback.format_exc()
    return outcomes


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"),
                                               tmp_path_factory.mktemp("gpu_paths") / "tiny")
    return launch.spawn_ranks(_run_cases, 1, args=(str(folder),), device_type="cuda", timeout_s=300)[0]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_one_gpu_path(outcomes, case):
    assert outcomes[case] is None, outcomes[case]
