"""gemm_signal: the Triton kernel (interpreted on CPU) against torch.matmul in fp64 and the reference; the row
group counters (exact final values, dirty-buffer reuse, the CPU path); the tile order; opcheck; bad inputs."""

import pytest
import torch
import triton
import triton.language as tl

from iso_kernels.ops import gemm_signal, signal_targets
from iso_kernels.reference import gemm_ref
from triton_ops.gemm_signal import _candidates, _tile_coords

from helpers import assert_close_to_ref

# (M, N, K, rows_per_signal); the interpreter's tiles are 16 x 64 x 32, so none of these is a multiple, and
# row groups of 7, 24 and 100 rows make tiles straddle two or three groups.
SHAPES = [
    (1, 33, 40, 16),
    (17, 130, 96, 7),
    (97, 33, 96, 48),
    (200, 130, 40, 24),
    (300, 130, 96, 100),
    (300, 130, 96, 128),
]
DTYPES = [torch.float32, torch.float16]
# (M, N, K, rows_per_signal, dtype): bf16 at Llama-70B TP shapes, then fp16 and fp32 (TF32 off) once each.
GPU_CASES = [
    (4096 + 17, 8192, 2048, 128, torch.bfloat16),
    (1000, 8192, 3584, 64, torch.bfloat16),
    (333, 1024, 7168, 48, torch.bfloat16),
    (1000, 8192, 2048, 16, torch.bfloat16),  # groups far smaller than the tiles
    (1000, 8192, 3584, 64, torch.float16),
    (1000, 1000, 1000, 128, torch.float32),
]
# (num_pid_m, num_pid_n, GROUP_M)
TILE_GRIDS = [(19, 3, 4), (1, 5, 8), (8, 8, 8), (7, 1, 2), (13, 9, 1)]
BAD_ROWS_PER_SIGNAL = [0, -16]


def make_inputs(m, n, k, dtype, device):
    return torch.randn(m, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)


def expected_counts(m, n, rows_per_signal):
    """Independent of the reference: rows of each group times N, by plain Python."""
    starts = range(0, m, rows_per_signal)
    return torch.tensor([min(rows_per_signal, m - s) * n for s in starts], dtype=torch.int32)


def check_gemm(out, x, weight):
    """fp64 torch.matmul is the oracle; the reference computed in x's dtype sets the allowed error."""
    assert out.dtype == x.dtype
    oracle = torch.matmul(x.double(), weight.double().T)
    assert_close_to_ref(out, oracle, gemm_ref(x, weight, upcast=False), name="gemm vs fp64 matmul")


@pytest.mark.parametrize("with_signal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rows_per_signal", SHAPES)
def test_gemm_matches_matmul(m, n, k, rows_per_signal, dtype, with_signal, device, triton_backend):
    x, weight = make_inputs(m, n, k, dtype, device)
    signal = torch.zeros(-(-m // rows_per_signal), dtype=torch.int32, device=device) if with_signal else None
    out = gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)
    check_gemm(out, x, weight)
    if with_signal:
        assert torch.equal(signal.cpu(), expected_counts(m, n, rows_per_signal))


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_dirty_signal_ends_at_target(backend, device):
    """A buffer left at the targets of an earlier call (or holding junk) ends at exactly the new targets."""
    m, n, k, rows_per_signal = 97, 130, 40, 32
    x, weight = make_inputs(m, n, k, torch.float32, device)
    target = expected_counts(m, n, rows_per_signal)
    signal = torch.randint(-(2**30), 2**30, target.shape, dtype=torch.int32).to(device)
    gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)
    assert torch.equal(signal.cpu(), target)
    out = gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)
    assert torch.equal(signal.cpu(), target)
    check_gemm(out, x, weight)


@pytest.mark.parametrize("m,k", [(0, 40), (33, 0)])
def test_empty_dims(m, k, device, triton_backend):
    x, weight = make_inputs(m, 65, k, torch.float32, device)
    signal = torch.full((-(-m // 16),), 5, dtype=torch.int32, device=device)
    out = gemm_signal(x, weight, signal, rows_per_signal=16)
    assert torch.equal(out, torch.zeros(m, 65, device=device))
    assert torch.equal(signal.cpu(), expected_counts(m, 65, 16))


def test_strided_inputs(device, triton_backend):
    """Non-contiguous x (row stride > K) and a transposed weight view go through the kernel's strides."""
    x = torch.randn(70, 2 * 48, device=device)[:, :48]
    weight = torch.randn(48, 130, device=device).T
    check_gemm(gemm_signal(x, weight), x, weight)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_opcheck(backend, device):
    """Schema (``signal`` mutated), fake, autograd registration and AOT dispatch, with and without a signal."""
    x, weight = torch.randn(40, 24, device=device), torch.randn(33, 24, device=device)
    signal = torch.zeros(3, dtype=torch.int32, device=device)
    for args in [(x, weight, None, 16), (x, weight, signal, 16), (x.half(), weight.half(), signal[:1], 64)]:
        torch.library.opcheck(torch.ops.iso_kernels.gemm_signal.default, args)


def test_configs_are_chosen_at_launch(monkeypatch):
    """The autotuner holds every GPU candidate whatever TRITON_INTERPRET said at import; each launch chooses:
    the one interpreter config straight on the kernel when interpreting, else the autotuner."""
    from triton_ops import _config
    from triton_ops import gemm_signal as module

    assert module._gemm_signal_kernel.configs == module._CONFIGS_16BIT + module._CONFIGS_FP32
    launches = []

    class Launcher:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid, args, kwargs))

    tuned, interpreter_config = Launcher("autotuner"), _config.config(BLOCK_M=16, num_warps=2)
    tuned.fn = Launcher("kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _config.launch_tuned(tuned, (3,), interpreter_config, "x", N=5)
    assert launches[-1] == ("kernel", (3,), ("x",), {"N": 5, **interpreter_config.all_kwargs()})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _config.launch_tuned(tuned, (3,), interpreter_config, "x", N=5)
    assert launches[-1] == ("autotuner", (3,), ("x",), {"N": 5})


def test_autotuning_times_briefly_and_keeps_its_results(monkeypatch):
    """Every autotuned launcher times its configs with ``_config.short_bench`` (a few ms each, not do_bench's
    125 ms), and ``_config.autotune`` has Triton keep the results on disk for the next process (Triton never
    does for interpreted kernels, so this one is built with TRITON_INTERPRET off)."""
    from triton_ops import _config, chunked_attention, chunked_attention_varlen
    from triton_ops import gemm_signal as module

    for tuned in (module._gemm_signal_kernel, chunked_attention._chunked_attention_fwd_kernel,
                  chunked_attention_varlen._chunked_attention_varlen_fwd_kernel):
        assert tuned.do_bench is _config.short_bench
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tuned = _config.autotune([_config.config(BLOCK=64), _config.config(BLOCK=128)], key=["M"])(
        _wait_then_copy_kernel)
    assert tuned.cache_results and tuned.do_bench is _config.short_bench
    calls = []

    class Driver:  # the active driver's benchmarker is do_bench on a GPU
        def get_benchmarker(self):
            return lambda fn, quantiles=None, **kwargs: calls.append((quantiles, kwargs)) or [1.0, 1.0, 1.0]

    monkeypatch.setattr(triton.runtime.driver, "_active", Driver())
    assert _config.short_bench(lambda: None, quantiles=(0.5,)) == [1.0, 1.0, 1.0]
    assert calls == [((0.5,), {"warmup": _config.BENCH_WARMUP_MS, "rep": _config.BENCH_REP_MS})]


def test_signal_targets():
    for m, n, rows_per_signal in [(300, 130, 128), (256, 7, 128), (1, 8192, 16), (0, 5, 16)]:
        targets = signal_targets(m, n, rows_per_signal)
        assert targets.dtype == torch.int32
        assert torch.equal(targets, expected_counts(m, n, rows_per_signal))


@pytest.mark.parametrize("rows_per_signal", BAD_ROWS_PER_SIGNAL)
def test_bad_rows_per_signal(rows_per_signal, device):
    x, weight = make_inputs(64, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="rows_per_signal"):
        gemm_signal(x, weight, rows_per_signal=rows_per_signal)
    with pytest.raises(ValueError, match="rows_per_signal"):
        signal_targets(64, 32, rows_per_signal)
    with pytest.raises(TypeError, match="rows_per_signal"):
        gemm_signal(x, weight, rows_per_signal=64.0)


def test_counter_overflow_rejected():
    with pytest.raises(ValueError, match="rows_per_signal"):
        signal_targets(2**20, 2**16, 2**16)


def test_bad_inputs(device):
    x, weight = make_inputs(128, 32, 16, torch.float32, device)
    good_signal = torch.zeros(2, dtype=torch.int32, device=device)
    cases = [
        ((x[None], weight, None), "x"),
        ((x, weight[None], None), "weight"),
        ((x, weight[:, :8], None), "weight"),
        ((x.half(), weight, None), "weight"),
        ((x.to(torch.int32), weight.to(torch.int32), None), "x"),
        ((x.double(), weight.double(), None), "x"),
        ((x, weight.to("meta"), None), "weight"),
        ((x, weight, torch.zeros(3, dtype=torch.int32, device=device)), "signal"),
        ((x, weight, good_signal.long()), "signal"),
        ((x, weight, good_signal.float()), "signal"),
        ((x, weight, good_signal[None]), "signal"),
        ((x, weight, good_signal.to("meta")), "signal"),
        ((x, weight, torch.zeros(4, dtype=torch.int32, device=device)[::2]), "signal"),
    ]
    gemm_signal(x, weight, good_signal, rows_per_signal=64)  # the cases differ from this in one thing
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            gemm_signal(*args, rows_per_signal=64)
    with pytest.raises(TypeError, match="x"):
        gemm_signal(x.tolist(), weight)
    with pytest.raises(TypeError, match="signal"):
        gemm_signal(x, weight, [0])


# --- tile order: programs -> tiles, probed through the kernel's own mapping ---
@triton.jit
def _probe_tile_coords_kernel(coords_ptr, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    tl.store(coords_ptr + 2 * pid, pid_m)
    tl.store(coords_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize("num_pid_m,num_pid_n,group_m", TILE_GRIDS)
def test_tile_order(num_pid_m, num_pid_n, group_m, device):
    tiles = num_pid_m * num_pid_n
    coords = torch.full((tiles, 2), -1, dtype=torch.int32, device=device)
    _probe_tile_coords_kernel[(tiles,)](coords, num_pid_m, num_pid_n, GROUP_M=group_m)
    coords = coords.cpu().tolist()
    assert sorted(map(tuple, coords)) == [(i, j) for i in range(num_pid_m) for j in range(num_pid_n)]
    # Each group of GROUP_M row tiles is issued whole (all its N tiles) before the next group starts.
    for pid, (pid_m, _) in enumerate(coords):
        assert pid_m // group_m == pid // (group_m * num_pid_n)
    # Hence row groups (here 2 row tiles each) complete in row order: the last program of group g
    # precedes the last program of group g + 1.
    last = {}
    for pid, (pid_m, _) in enumerate(coords):
        last[pid_m // 2] = pid
    assert [last[g] for g in sorted(last)] == sorted(last.values())


@pytest.mark.parametrize("is_fp32", [False, True])
@pytest.mark.parametrize("rows_per_signal", [1, 16, 48, 64, 100, 128, 256, 384])
def test_signal_granularity_keeps_the_tile_shapes(rows_per_signal, is_fp32):
    """Row-group size never changes a tile (small groups keep the tensor-core tiles); it only caps how many
    row tiles are issued together, so that those fit inside one row group when the group allows it."""
    plain, signalled = _candidates(is_fp32), _candidates(is_fp32, rows_per_signal)
    assert len(signalled) == len(plain)
    for cfg, cfg_signalled in zip(plain, signalled, strict=True):
        block_m = cfg.kwargs["BLOCK_M"]
        assert {**cfg_signalled.kwargs, "GROUP_M": cfg.kwargs["GROUP_M"]} == cfg.kwargs
        assert (cfg_signalled.num_warps, cfg_signalled.num_stages) == (cfg.num_warps, cfg.num_stages)
        assert cfg_signalled.kwargs["GROUP_M"] * block_m <= max(rows_per_signal, block_m)
        assert cfg_signalled.kwargs["GROUP_M"] == max(1, min(cfg.kwargs["GROUP_M"], rows_per_signal // block_m))


# --- GPU: bf16, large shapes, TF32 off, and a real waiter on another stream ---
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,rows_per_signal,dtype", GPU_CASES)
def test_gemm_gpu(m, n, k, rows_per_signal, dtype):
    x, weight = make_inputs(m, n, k, dtype, "cuda")
    signal = torch.zeros(-(-m // rows_per_signal), dtype=torch.int32, device="cuda")
    out = gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)
    check_gemm(out, x, weight)
    assert torch.equal(signal.cpu(), expected_counts(m, n, rows_per_signal))


@triton.jit
def _wait_then_copy_kernel(signal_ptr, target_ptr, src_ptr, dst_ptr, spins_ptr, M, N, rows_per_signal,
                           MAX_SPINS: tl.constexpr, BLOCK: tl.constexpr):
    """Program g spins (acquire) until counter g reaches its target, then copies row group g."""
    g = tl.program_id(0).to(tl.int64)
    target = tl.load(target_ptr + g)
    count = tl.atomic_add(signal_ptr + g, 0, sem="acquire", scope="gpu")
    spins = 0
    while (count != target) & (spins < MAX_SPINS):
        count = tl.atomic_add(signal_ptr + g, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.store(spins_ptr + g, spins)
    start = g * rows_per_signal * N
    end = tl.minimum((g + 1) * rows_per_signal, M) * N
    for offset in range(start, end, BLOCK):
        offs = offset + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < end), mask=offs < end)


@pytest.mark.gpu
def test_waiter_on_side_stream_sees_finished_rows():
    """The documented overlap recipe: zero, record an event, launch the GEMM; a side stream that waits on
    the event spins on each counter (acquire) while the GEMM runs, then copies that row group."""
    m, n, k, rows_per_signal = 8192, 8192, 4096, 1024
    max_spins = 50_000_000
    x, weight = make_inputs(m, n, k, torch.bfloat16, "cuda")
    groups = m // rows_per_signal
    signal = torch.zeros(groups, dtype=torch.int32, device="cuda")
    gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)  # autotune this very key before the race
    targets = signal_targets(m, n, rows_per_signal, device="cuda")
    seen = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    spins = torch.full((groups,), -1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    signal.zero_()
    zeroed = torch.cuda.Event()
    zeroed.record()
    out = gemm_signal(x, weight, signal, rows_per_signal=rows_per_signal)
    with torch.cuda.stream(side):
        side.wait_event(zeroed)
        out.record_stream(side)
        _wait_then_copy_kernel[(groups,)](signal, targets, out, seen, spins, m, n, rows_per_signal,
                                          MAX_SPINS=max_spins, BLOCK=4096)
    torch.cuda.synchronize()
    assert (spins.cpu() < max_spins).all(), f"a waiter timed out: spins {spins.tolist()}"
    assert torch.equal(signal, targets)
    assert torch.equal(seen, out)
