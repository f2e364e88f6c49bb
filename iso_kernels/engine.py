"""The prefill job: load a TP shard on every rank, run serial and ISO prefill, measure, check, decode.

``run(PrefillConfig)`` validates everything it can before starting ranks, launches them (or, under torchrun,
joins the existing group) and returns rank 0's report. ``prefill_rank`` is what each rank executes.
"""

import dataclasses
import json
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import cache, checkpoint, comm, costmodel, hardware, launch, schedule
from .model import ModelArgs
from .timeline import Timeline, busy_ms

# A thread lock only: tqdm's default lock adds a multiprocessing semaphore, which a rank stopped by a signal
# never releases (resource_tracker's "leaked semaphore" warning at exit). Only rank 0 draws a bar.
tqdm.set_lock(threading.RLock())

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Logits of the ISO and serial prefill must agree to this, relative to the largest logit. fp32 differences
# come only from GEMMs over chunk-sized rather than whole-prompt row blocks.
AGREEMENT_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class PrefillConfig:
    model: str = "llama-small"
    tp: int = 2
    seq_len: int = 512
    batch: int = 1
    mode: str = "both"  # serial | iso | both
    split: str = "auto"  # auto | token index | fraction
    chunks: str = "auto"  # auto (the solver's choice, up to MAX_AUTO_CHUNKS) | N
    link: Optional[str] = None  # None | preset name | ratio:R
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    tokens: Optional[str] = None
    generate: int = 4
    warmup: int = 2
    repeats: int = 5
    comm_backend: str = "auto"
    row_signal: int = 0  # rows per signal group on GPU (0 = whole-block all-reduces)
    seed: int = 0
    trace: bool = False
    save_logits: bool = False
    recalibrate: bool = False  # ignore the cached cost-model constants and measure again
    timeout_s: float = 600.0


MAX_AUTO_CHUNKS = 4
# The calibrated model's error (bench/README.md: up to ~30% on the CPU dev machine) dwarfs the few percent
# between nearby splits, and there its uneven two-chunk splits never beat the even ones. So an uneven split
# must be predicted this much faster than the even split with the same number of chunks to be used.
UNEVEN_SPLIT_MIN_GAIN = 0.03
# Calibration times blocks of seq_len/8 .. seq_len/2 tokens after prefixes up to seq_len/2; below this the
# sizes collapse and cannot separate the model's terms, so short prompts get the even split and no prediction.
MIN_CALIBRATION_TOKENS = 16


# --- validation before any rank starts ---
def resolve(cfg: PrefillConfig):
    """Check the configuration; returns (device, dtype, checkpoint folder, ModelArgs, token tensor or None)."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if cfg.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {cfg.tp}")
    if device == "cuda" and cfg.tp > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp {cfg.tp} needs {cfg.tp} GPUs; {torch.cuda.device_count()} visible")
    dtype_name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} or auto, got {cfg.dtype!r}")
    if cfg.mode not in ("serial", "iso", "both"):
        raise ValueError(f"--mode must be serial, iso or both, got {cfg.mode!r}")
    if cfg.batch < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.generate < 0:
        raise ValueError("--batch and --repeats must be >= 1; --warmup and --generate >= 0")
    comm.parse_link(cfg.link)
    folder = model_folder(cfg.model)
    args = ModelArgs.from_hf_config(checkpoint.read_config(folder))
    from . import tp

    tp.check_divisible(args, cfg.tp)
    tokens = load_tokens(cfg.tokens, args.vocab_size) if cfg.tokens else None
    seq_len = tokens.shape[1] if tokens is not None else cfg.seq_len
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1, got {seq_len}")
    if seq_len + cfg.generate > args.max_seq_len:
        raise ValueError(f"a prompt of {seq_len} tokens plus {cfg.generate} generated exceeds the model's "
                         f"{args.max_seq_len} positions")
    chunk_split(cfg, seq_len)  # rejects splits outside the prompt before ranks start
    return device, DTYPES[dtype_name], folder, args, tokens


def model_folder(model):
    """A checkpoint folder, or a preset's random checkpoint made once in the cache folder."""
    if model in checkpoint.PRESETS:
        return cache.preset_checkpoint(model)  # safe when several runs or torchrun's ranks make it at once
    folder = Path(model)
    if not folder.is_dir():
        raise ValueError(f"--model {model!r} is neither a preset ({', '.join(sorted(checkpoint.PRESETS))}) "
                         "nor a checkpoint folder")
    return folder


def load_tokens(path, vocab_size):
    """Token ids from a JSON list (one prompt) or list of equal-length lists (a batch)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--tokens {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"--tokens {path}: invalid JSON ({exc})") from None
    rows = data if isinstance(data, list) and data and isinstance(data[0], list) else [data]
    if (not all(isinstance(r, list) and r for r in rows) or any(len(r) != len(rows[0]) for r in rows)):
        raise ValueError(f"--tokens {path}: need a non-empty list of ids or equal-length lists of ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r):
        raise ValueError(f"--tokens {path}: token ids must be integers")
    tokens = torch.tensor(rows, dtype=torch.long)
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"--tokens {path}: ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens


def chunk_split(cfg, seq_len):
    """The user's split as schedule.chunk_bounds understands it, or "auto"."""
    if cfg.chunks != "auto":
        try:
            n_chunks = int(cfg.chunks)
        except ValueError:
            raise ValueError(f"--chunks must be auto or an integer, got {cfg.chunks!r}") from None
        if n_chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {n_chunks}")
        if seq_len < n_chunks:
            raise ValueError(f"a prompt of {seq_len} tokens is shorter than --chunks {n_chunks}")
    if cfg.split == "auto":
        return "auto"
    try:
        split = int(cfg.split)
    except ValueError:
        try:
            split = float(cfg.split)
        except ValueError:
            raise ValueError(f"--split must be auto, a token index or a fraction, got {cfg.split!r}") from None
    if cfg.chunks not in ("auto", "2"):
        raise ValueError("--split INDEX|FRACTION gives two chunks; use --split auto with --chunks N")
    if isinstance(split, int) and not 0 < split < seq_len:
        raise ValueError(f"--split {split} is outside the prompt (1 .. {seq_len - 1})")
    schedule.chunk_bounds(seq_len, split)
    return split


# --- per-rank job ---
def _timed(fn, device, repeats=3):
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _traced_run(run_with_timeline, device):
    """One run started in step on every rank: (its output, the slowest rank's seconds, its intervals)."""
    dist.barrier()
    _sync(device)
    timeline = Timeline(device)
    start = time.perf_counter()
    out = run_with_timeline(timeline)
    _sync(device)
    return out, _max_over_ranks(time.perf_counter() - start), timeline.intervals()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _max_over_ranks(value):
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _calibrate(model, communicator, device, dtype, cfg, batch, seq_len):
    """Fit the cost model's constants to this model's blocks on this machine (cached), on rank 0's timings."""
    layer, args = model.layers[0], model.args
    key = dict(model=cfg.model, tp=cfg.tp, batch=batch, seq_len=seq_len, device=_device_name(device), dtype=str(dtype),
               threads=torch.get_num_threads(), link=cfg.link, comm=communicator.name if communicator else None)
    cached = costmodel.load_calibration(None, key) if dist.get_rank() == 0 and not cfg.recalibrate else None
    cached = _broadcast(cached)
    if cached is not None:
        return cached
    sizes = sorted({max(1, seq_len // d) for d in (8, 4, 2)})
    prefixes = sorted({0, seq_len // 4, seq_len // 2})

    def measure_attention(n, p):
        x = torch.randn(batch, n, args.dim, device=device, dtype=dtype)
        return _timed(lambda: layer.attention(x, p, model.rope), device)

    def measure_mlp(n):
        x = torch.randn(batch, n, args.dim, device=device, dtype=dtype)
        return _timed(lambda: layer.feed_forward(x), device)

    def measure_all_reduce(nbytes):
        if communicator is None:
            return 1e-9  # TP=1 without a link: no communication to model
        x = torch.zeros(nbytes // dtype.itemsize, device=device, dtype=dtype)
        dist.barrier()
        return _timed(lambda: communicator.all_reduce(x), device)

    token_bytes = batch * args.dim * dtype.itemsize
    fit = costmodel.fit_layer_costs(measure_attention, measure_mlp, measure_all_reduce, token_sizes=sizes,
                                    prefix_sizes=prefixes, byte_sizes=[token_bytes * n for n in sizes],
                                    batch=batch)
    costs = _broadcast(fit.costs)
    if dist.get_rank() == 0:
        costmodel.save_calibration(None, costs, key)
    return costs


def _device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu x{os.cpu_count()}"


def prefill_rank(rank, world_size, cfg: PrefillConfig):
    """One rank of the prefill job; rank 0's return value is the report."""
    device, dtype, folder, args, tokens = resolve(cfg)
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.manual_seed(cfg.seed)
    model = checkpoint.load_checkpoint(folder, rank=rank, world_size=world_size, device=device, dtype=dtype)
    if tokens is None:
        tokens = torch.randint(0, args.vocab_size, (cfg.batch, cfg.seq_len))
    tokens = tokens.to(device)
    batch, seq_len = tokens.shape
    model.setup_caches(batch, seq_len + cfg.generate)

    link = comm.parse_link(cfg.link)
    communicator = None
    if world_size > 1 or link is not None:
        placeholder = comm.LinkModel("pending", 0.0, math.inf) if isinstance(link, float) else link
        communicator = comm.make_communicator(cfg.comm_backend, link=placeholder)
    unsplit = [(0, seq_len)]

    def prefill(bounds, mode, communicator=communicator, timeline=None):
        return schedule.forward(model, tokens, communicator, bounds, schedule=mode, timeline=timeline,
                                row_signal_rows=cfg.row_signal or None)

    with torch.inference_mode():
        # No-communication time of the unsplit prefill: the floor, and what a ratio link is derived from.
        compute_only_s = _max_over_ranks(_timed(lambda: prefill(unsplit, "serial", None), device))
        if isinstance(link, float):
            per_block = batch * seq_len * args.dim * dtype.itemsize
            communicator.set_link(comm.link_for_ratio(link, compute_only_s, per_block, 2 * args.n_layer,
                                                      world_size))
        # The block fits give the shape of the costs; the whole serial prefill measured here fixes their scale
        # (an emulated link's cost is known exactly instead, below).
        link_model = getattr(communicator, "link", None)
        serial_comm_s = 0.0
        if communicator is not None and link_model is None:
            serial_comm_s = _max_over_ranks(statistics.median(
                busy_ms(_traced_run(lambda t: prefill(unsplit, "serial", timeline=t), device)[2], "comm") / 1e3
                for _ in range(2)))
        predict_kw = dict(batch=batch, hidden=args.dim, dtype_bytes=dtype.itemsize)
        costs = None
        if seq_len >= MIN_CALIBRATION_TOKENS:
            costs = _calibrate(model, communicator, device, dtype, cfg, batch, seq_len)
            modelled = costmodel.simulate_prefill(costs, args.n_layer, seq_len, [seq_len], **predict_kw)
            if link_model is not None:
                # An emulated link's cost is known exactly; a fit of timed collectives would add the ranks'
                # skew to it as a spurious latency, paid once more per extra chunk.
                costs = dataclasses.replace(costs, ar_latency=link_model.latency_s, ar_bandwidth=(
                    link_model.bus_bandwidth / hardware.ring_factor(communicator.traffic_world_size)))
            scale_comm = serial_comm_s > 0 and modelled.comm_s > 0
            costs = costs.scaled(compute=compute_only_s / modelled.compute_s,
                                 comm=serial_comm_s / modelled.comm_s if scale_comm else 1.0)
        # Every rank must run the same chunks (or their collectives mismatch): rank 0's choice is everyone's.
        bounds = _broadcast(_choose_bounds(cfg, costs, args.n_layer, seq_len, predict_kw))
        ends = [end for _, end in bounds]
        predicted = costmodel.predict(costs, args.n_layer, seq_len, ends, **predict_kw) if costs else None

        # "serial-chunks" (serial over the ISO chunks) is timed beside the two schedules when both run: its
        # compute stream is the chunked schedule's own compute, which the bound needs (on CPU the attention
        # reference does less work in chunks than unsplit), and its logits must equal ISO's bit for bit.
        modes = ["serial", "iso", "serial-chunks"] if cfg.mode == "both" else [cfg.mode]
        plans = {"serial": (unsplit, "serial"), "iso": (bounds, "iso"), "serial-chunks": (bounds, "serial")}
        runs = {mode: [] for mode in modes}
        traces = {mode: [] for mode in modes}
        logits = {}
        steps = range(cfg.warmup + cfg.repeats)
        # disable=None: no bar when stderr is not a terminal (logs, tests)
        for step in (tqdm(steps, desc="prefill runs", leave=False, disable=None) if rank == 0 else steps):
            for mode in modes:  # interleaved, so drift in machine load hits both schedules alike
                logits[mode], elapsed, intervals = _traced_run(
                    lambda t, plan=plans[mode]: prefill(*plan, timeline=t), device)
                if step >= cfg.warmup:
                    runs[mode].append(elapsed)
                    traces[mode].append(intervals)

        report = dict(tp=world_size, seq_len=seq_len, batch=batch, device=_device_name(device), dtype=str(dtype),
                      comm_backend=_backend_name(communicator), link=_link_name(communicator),
                      split=ends[0] if len(ends) == 2 else ends, chunks=len(bounds), bounds=bounds,
                      compute_only_ms=compute_only_s * 1e3,
                      predicted_serial_ms=predicted.serial_s * 1e3 if predicted else math.nan,
                      predicted_iso_ms=predicted.iso_s * 1e3 if predicted else math.nan)
        for mode in modes:
            report[f"{mode}_ms"] = statistics.median(runs[mode]) * 1e3
            report[f"{mode}_runs_ms"] = [t * 1e3 for t in runs[mode]]
        lanes = {(mode, rank): traces[mode][-1] for mode in modes if mode != "serial-chunks"}
        if cfg.mode == "both":
            report.update(_overlap_metrics(report, traces))
            report["iso_equals_serial_same_chunks"] = bool(torch.equal(logits["serial-chunks"], logits["iso"]))
            scale = logits["serial"].abs().max().item()
            report["max_abs_diff"] = (logits["iso"] - logits["serial"]).abs().max().item()
            report["agree"] = report["max_abs_diff"] <= AGREEMENT_RTOL[dtype] * (1 + scale)

        generated = _greedy_decode(model, tokens, communicator, logits[modes[-1]], cfg.generate) \
            if cfg.generate else None
    if communicator is not None:
        communicator.close()
    all_lanes = [None] * world_size
    dist.all_gather_object(all_lanes, lanes if cfg.trace else {})
    # Leave together: a rank that exits while a peer's gloo pair still expects traffic makes that peer's
    # transport thread abort ("Connection reset by peer"), seen under torchrun.
    dist.barrier()
    if rank != 0:
        return None
    report["generated"] = generated
    if cfg.trace:
        report["lanes"] = {key: rows for per_rank in all_lanes for key, rows in per_rank.items()}
    if cfg.save_logits:
        report["logits"] = {mode: logits[mode].float().cpu() for mode in modes if mode != "serial-chunks"}
    return report


def _choose_bounds(cfg, costs, n_layers, seq_len, predict_kw):
    """The ISO chunks: the user's split, or with --split auto the cost model's choice (the even split when
    the prompt is too short to calibrate on, or when an uneven split is not predicted clearly faster)."""
    split = chunk_split(cfg, seq_len)
    if split != "auto":
        return schedule.chunk_bounds(seq_len, split)
    fixed_chunks = None if cfg.chunks == "auto" else int(cfg.chunks)
    if costs is None:
        return schedule.chunk_bounds(seq_len, chunks=fixed_chunks or min(2, seq_len))
    ends = costmodel.choose_split(costs, n_layers, seq_len, max_chunks=fixed_chunks or MAX_AUTO_CHUNKS,
                                  min_gain=0.0, **predict_kw)
    if fixed_chunks and len(ends) != fixed_chunks:
        ends = costmodel.balanced_split(costs, seq_len, fixed_chunks)
    even = [end for _, end in schedule.chunk_bounds(seq_len, chunks=len(ends))]

    def predicted_iso_s(chunk_ends):
        return costmodel.predict(costs, n_layers, seq_len, chunk_ends, **predict_kw).iso_s

    if predicted_iso_s(ends) > (1 - UNEVEN_SPLIT_MIN_GAIN) * predicted_iso_s(even):
        ends = even
    return schedule.chunk_bounds(seq_len, ends)


def _overlap_metrics(report, traces):
    """Per-stream busy time of the serial runs, the achievable bound, and the share of it ISO takes (medians
    over the timed runs). The bound is max(chunked compute + tail, comm + head) (see costmodel.predict), with
    the compute of the same chunks run serially, since chunking itself can change the amount of compute."""

    def head(rows):  # the first chunk's first attention block: nothing can be communicated before it ends
        first = next(r for r in rows if r["stream"] == "compute")
        return first["end_ms"] - first["start_ms"]

    def tail(rows):  # the last all-reduce: nothing can be computed while it runs
        comm_rows = [r for r in rows if r["stream"] == "comm"]
        return comm_rows[-1]["end_ms"] - comm_rows[-1]["start_ms"] if comm_rows else 0.0

    compute_ms = statistics.median(busy_ms(rows, "compute") for rows in traces["serial"])
    comm_ms = statistics.median(busy_ms(rows, "comm") for rows in traces["serial"])
    chunked_compute_ms = statistics.median(busy_ms(rows, "compute") for rows in traces["serial-chunks"])
    head_ms = statistics.median(head(rows) for rows in traces["iso"])
    tail_ms = statistics.median(tail(rows) for rows in traces["iso"])
    if report["comm_backend"] != "none" and not any(r["stream"] == "comm" for r in traces["serial"][0]):
        comm_ms = math.nan  # torch.distributed over NCCL exposes no stream to time: no bound without it
    bound_ms = max(chunked_compute_ms + tail_ms, comm_ms + head_ms) if math.isfinite(comm_ms) else math.nan
    achievable = report["serial_ms"] - bound_ms
    gained = report["serial_ms"] - report["iso_ms"]
    return dict(compute_ms=compute_ms, comm_ms=comm_ms, chunked_compute_ms=chunked_compute_ms,
                bound_ms=bound_ms, head_ms=head_ms, tail_ms=tail_ms,
                reduction=gained / report["serial_ms"],
                overlap_efficiency=gained / achievable if achievable > 0 else math.nan)


def _greedy_decode(model, tokens, communicator, prefill_logits, steps):
    """Plain greedy decode from the KV cache the prefill filled (ISO is a prefill technique)."""
    position = tokens.shape[1]
    next_token = prefill_logits[:, -1].argmax(-1)
    generated = [next_token]
    for _ in range(steps - 1):
        step_logits = schedule.forward(model, next_token[:, None], communicator, [(position, position + 1)],
                                       schedule="serial", all_logits=False)
        next_token = step_logits.argmax(-1)
        generated.append(next_token)
        position += 1
    return torch.stack(generated, dim=1).tolist()


def _backend_name(communicator):
    if communicator is None:
        return "none"
    return getattr(communicator, "inner", communicator).name


def _link_name(communicator):
    link = getattr(communicator, "link", None)
    return dataclasses.asdict(link) if link is not None else None


# --- launching ---
def run(cfg: PrefillConfig):
    """Validate, start the ranks (or join torchrun's group) and return rank 0's report."""
    device, *_ = resolve(cfg)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and not dist.is_initialized():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size != cfg.tp:
            raise ValueError(f"--tp {cfg.tp} differs from torchrun's WORLD_SIZE {world_size}")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        try:
            return prefill_rank(rank, world_size, cfg)
        finally:
            dist.destroy_process_group()
    return launch.spawn_ranks(prefill_rank, cfg.tp, args=(cfg,), device_type=device, timeout_s=cfg.timeout_s)[0]
