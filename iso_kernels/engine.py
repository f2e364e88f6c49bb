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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint, comm, costmodel, hardware, launch, schedule
from .metrics import broadcast, max_over_ranks, median_seconds, overlap_metrics, traced_run
from .model import ModelArgs
from .split import ChunkSplit
from .timeline import busy_ms

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
    folder = checkpoint.model_folder(cfg.model)
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
    requested_split(cfg, seq_len)  # rejects splits outside the prompt before ranks start
    return device, DTYPES[dtype_name], folder, args, tokens


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


def requested_split(cfg, seq_len):
    """(the user's ChunkSplit, or None for --split auto; the number of chunks asked for, or None for auto)."""
    chunks = None
    if cfg.chunks != "auto":
        try:
            chunks = int(cfg.chunks)
        except ValueError:
            raise ValueError(f"--chunks must be auto or an integer, got {cfg.chunks!r}") from None
        if chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {chunks}")
        if seq_len < chunks:
            raise ValueError(f"a prompt of {seq_len} tokens is shorter than --chunks {chunks}")
    if cfg.split == "auto":
        return None, chunks
    try:
        where = int(cfg.split)
    except ValueError:
        try:
            where = float(cfg.split)
        except ValueError:
            raise ValueError(f"--split must be auto, a token index or a fraction, got {cfg.split!r}") from None
    if chunks not in (None, 2):
        raise ValueError("--split INDEX|FRACTION gives two chunks; use --split auto with --chunks N")
    try:
        return ChunkSplit.at(seq_len, where), chunks
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


# --- per-rank job ---
def _calibrate(model, communicator, device, dtype, cfg, batch, seq_len):
    """Fit the cost model's constants to this model's blocks on this machine (cached), on rank 0's timings."""
    layer, args = model.layers[0], model.args
    key = dict(model=cfg.model, tp=cfg.tp, batch=batch, seq_len=seq_len, device=_device_name(device), dtype=str(dtype),
               threads=torch.get_num_threads(), link=cfg.link, comm=communicator.name if communicator else None)
    cached = costmodel.load_calibration(None, key) if dist.get_rank() == 0 and not cfg.recalibrate else None
    cached = broadcast(cached)
    if cached is not None:
        return cached
    sizes = sorted({max(1, seq_len // d) for d in (8, 4, 2)})
    prefixes = sorted({0, seq_len // 4, seq_len // 2})

    def measure_attention(n, p):
        x = torch.randn(batch, n, args.dim, device=device, dtype=dtype)
        return median_seconds(lambda: layer.attention(x, p, model.rope), device)

    def measure_mlp(n):
        x = torch.randn(batch, n, args.dim, device=device, dtype=dtype)
        return median_seconds(lambda: layer.feed_forward(x), device)

    def measure_all_reduce(nbytes):
        if communicator is None:
            return 1e-9  # TP=1 without a link: no communication to model
        x = torch.zeros(nbytes // dtype.itemsize, device=device, dtype=dtype)
        dist.barrier()
        return median_seconds(lambda: communicator.all_reduce(x), device)

    token_bytes = batch * args.dim * dtype.itemsize
    fit = costmodel.fit_layer_costs(measure_attention, measure_mlp, measure_all_reduce, token_sizes=sizes,
                                    prefix_sizes=prefixes, byte_sizes=[token_bytes * n for n in sizes],
                                    batch=batch)
    costs = broadcast(fit.costs)
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
    prefill = _Prefill(cfg, model, tokens.to(device), device, dtype)
    model.setup_caches(prefill.batch, prefill.seq_len + cfg.generate)
    with torch.inference_mode():
        # No-communication time of the unsplit prefill: the floor, and what a ratio link is derived from.
        compute_only_s = max_over_ranks(median_seconds(lambda: prefill.run(None, "serial"), device))
        prefill.communicator = _open_communicator(prefill, compute_only_s)
        split, predicted = _plan(prefill, compute_only_s)
        logits, runs, traces = _timed_runs(prefill, split, show_progress=rank == 0)
        report = _report(prefill, split, predicted, compute_only_s, logits, runs, traces)
        last_logits = logits["serial-chunks" if cfg.mode == "both" else cfg.mode]
        generated = _greedy_decode(prefill, last_logits, cfg.generate) if cfg.generate else None
    if prefill.communicator is not None:
        prefill.communicator.close()
    lanes = {(mode, rank): rows[-1] for mode, rows in traces.items() if mode != "serial-chunks"}
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
        report["logits"] = {mode: out.float().cpu() for mode, out in logits.items() if mode != "serial-chunks"}
    return report


@dataclass
class _Prefill:
    """One rank's prefill: the model shard, the prompt, and the TP group's communicator (None at TP=1
    without a link)."""

    cfg: PrefillConfig
    model: object
    tokens: torch.Tensor
    device: str
    dtype: torch.dtype
    communicator: object = None

    @property
    def batch(self):
        return self.tokens.shape[0]

    @property
    def seq_len(self):
        return self.tokens.shape[1]

    def predict_kw(self):
        return dict(batch=self.batch, hidden=self.model.args.dim, dtype_bytes=self.dtype.itemsize)

    def run(self, split, mode, timeline=None):
        """Logits of the prompt in the chunks of ``split`` (None: unsplit) under schedule ``mode``."""
        return schedule.forward(self.model, self.tokens, self.communicator, split, schedule=mode,
                                timeline=timeline, row_signal_rows=self.cfg.row_signal or None)


def _open_communicator(prefill, compute_only_s):
    """The TP group's communicator (None at TP=1 without a link), over the emulated link --link asks for."""
    cfg, args = prefill.cfg, prefill.model.args
    link_spec = comm.parse_link(cfg.link)
    if cfg.tp == 1 and link_spec is None:
        return None
    per_block = prefill.batch * prefill.seq_len * args.dim * prefill.dtype.itemsize
    link = link_spec.resolve(compute_only_s, per_block, 2 * args.n_layer, cfg.tp) if link_spec else None
    return comm.make_communicator(cfg.comm_backend, link=link)


def _plan(prefill, compute_only_s):
    """(the ISO chunks, their predicted times or None), the same on every rank."""
    cfg, model, seq_len = prefill.cfg, prefill.model, prefill.seq_len
    costs = _fitted_costs(prefill, compute_only_s) if seq_len >= MIN_CALIBRATION_TOKENS else None
    split, chunks = requested_split(cfg, seq_len)
    if split is None:
        split = costmodel.prefill_split(costs, model.args.n_layer, seq_len, chunks, **prefill.predict_kw())
    # Every rank must run the same chunks (or their collectives mismatch): rank 0's choice is everyone's.
    split = broadcast(split)
    predicted = costmodel.predict(costs, model.args.n_layer, seq_len, split, **prefill.predict_kw()) \
        if costs else None
    return split, predicted


def _fitted_costs(prefill, compute_only_s):
    """The calibrated block costs, scaled so that the model predicts this machine's whole serial prefill."""
    model, communicator, unsplit = prefill.model, prefill.communicator, ChunkSplit((prefill.seq_len,))
    # The block fits give the shape of the costs; the whole serial prefill measured here fixes their scale
    # (an emulated link's cost is known exactly instead, below).
    link_model = getattr(communicator, "link", None)
    serial_comm_s = 0.0
    if communicator is not None and link_model is None:
        serial_comm_s = max_over_ranks(statistics.median(
            busy_ms(traced_run(lambda t: prefill.run(unsplit, "serial", t), prefill.device)[2], "comm") / 1e3
            for _ in range(2)))
    costs = _calibrate(model, communicator, prefill.device, prefill.dtype, prefill.cfg, prefill.batch,
                       prefill.seq_len)
    modelled = costmodel.simulate_prefill(costs, model.args.n_layer, prefill.seq_len, unsplit,
                                          **prefill.predict_kw())
    if link_model is not None:
        # An emulated link's cost is known exactly; a fit of timed collectives would add the ranks' skew to it
        # as a spurious latency, paid once more per extra chunk.
        costs = dataclasses.replace(costs, ar_latency=link_model.latency_s, ar_bandwidth=(
            link_model.bus_bandwidth / hardware.ring_factor(communicator.traffic_world_size)))
    scale_comm = serial_comm_s > 0 and modelled.comm_s > 0
    return costs.scaled(compute=compute_only_s / modelled.compute_s,
                        comm=serial_comm_s / modelled.comm_s if scale_comm else 1.0)


def _timed_runs(prefill, split, show_progress):
    """({mode: logits}, {mode: seconds per timed run}, {mode: timeline rows per timed run}).

    "serial-chunks" (serial over the ISO chunks) is timed beside the two schedules when both run: its compute
    stream is the chunked schedule's own compute, which the bound needs (on CPU the attention reference does
    less work in chunks than unsplit), and its logits must equal ISO's bit for bit.
    """
    cfg = prefill.cfg
    modes = ["serial", "iso", "serial-chunks"] if cfg.mode == "both" else [cfg.mode]
    plans = {"serial": (ChunkSplit((prefill.seq_len,)), "serial"), "iso": (split, "iso"),
             "serial-chunks": (split, "serial")}
    runs = {mode: [] for mode in modes}
    traces = {mode: [] for mode in modes}
    logits = {}
    steps = range(cfg.warmup + cfg.repeats)
    # disable=None: no bar when stderr is not a terminal (logs, tests)
    for step in (tqdm(steps, desc="prefill runs", leave=False, disable=None) if show_progress else steps):
        for mode in modes:  # interleaved, so drift in machine load hits both schedules alike
            logits[mode], elapsed, intervals = traced_run(lambda t, plan=plans[mode]: prefill.run(*plan, t),
                                                          prefill.device)
            if step >= cfg.warmup:
                runs[mode].append(elapsed)
                traces[mode].append(intervals)
    return logits, runs, traces


def _report(prefill, split, predicted, compute_only_s, logits, runs, traces):
    """Rank 0's report of the timed runs (the keys ``cli.format_report`` and the benchmarks read)."""
    communicator, ends = prefill.communicator, list(split.ends)
    report = dict(tp=prefill.cfg.tp, seq_len=prefill.seq_len, batch=prefill.batch,
                  device=_device_name(prefill.device), dtype=str(prefill.dtype),
                  comm_backend=_backend_name(communicator), link=_link_name(communicator),
                  split=ends[0] if len(ends) == 2 else ends, chunks=len(split), bounds=split.bounds(),
                  compute_only_ms=compute_only_s * 1e3,
                  predicted_serial_ms=predicted.serial_s * 1e3 if predicted else math.nan,
                  predicted_iso_ms=predicted.iso_s * 1e3 if predicted else math.nan)
    for mode, seconds in runs.items():
        report[f"{mode}_ms"] = statistics.median(seconds) * 1e3
        report[f"{mode}_runs_ms"] = [t * 1e3 for t in seconds]
    if prefill.cfg.mode == "both":
        report.update(overlap_metrics(report["serial_ms"], report["iso_ms"], traces,
                                      has_comm=report["comm_backend"] != "none"))
        report["iso_equals_serial_same_chunks"] = bool(torch.equal(logits["serial-chunks"], logits["iso"]))
        scale = logits["serial"].abs().max().item()
        report["max_abs_diff"] = (logits["iso"] - logits["serial"]).abs().max().item()
        report["agree"] = report["max_abs_diff"] <= AGREEMENT_RTOL[prefill.dtype] * (1 + scale)
    return report


def _greedy_decode(prefill, prefill_logits, steps):
    """Plain greedy decode from the KV cache the prefill filled (ISO is a prefill technique)."""
    position = prefill.seq_len
    next_token = prefill_logits[:, -1].argmax(-1)
    generated = [next_token]
    for _ in range(steps - 1):
        step_logits = schedule.forward(prefill.model, next_token[:, None], prefill.communicator, start=position,
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
