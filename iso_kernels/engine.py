"""The prefill job: load a TP shard on every rank, run serial and ISO prefill, measure, check, decode.

``run(PrefillConfig)`` validates everything it can before starting ranks, launches them (or, under torchrun,
joins the existing group) and returns rank 0's ``PrefillReport``. ``prefill_rank`` is what each rank executes.
"""

import dataclasses
import itertools
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import batch, checkpoint, comm, launch, measure, models, planning, schedule, tp
from .metrics import device_name, median_seconds, overlap_metrics, traced_run
from .model import ModelArgs
from .paged_cache import PackedBatch, PagedCache
from .report import PrefillReport
from .split import ChunkSplit

# A thread lock only: tqdm's default lock adds a multiprocessing semaphore, which a rank stopped by a signal
# never releases (resource_tracker's "leaked semaphore" warning at exit). Only rank 0 draws a bar.
tqdm.set_lock(threading.RLock())

# Logits of the ISO and serial prefill must agree to this, relative to the largest logit. fp32 differences
# come only from GEMMs over chunk-sized rather than whole-prompt row blocks.
AGREEMENT_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class PrefillConfig:
    """One prefill job in checked types (``cli`` turns the command line into one); None means "choose"."""

    model: str = "llama-small"  # a preset name or a Hugging Face checkpoint folder
    tp: int = 2
    seq_len: int = 512
    batch: int = 1
    mode: str = "both"  # serial | iso | both
    split: int | float | None = None  # the second chunk's first token, or a fraction; None: planned
    chunks: int | None = None  # None: the planner's choice of up to planning.policy.MAX_AUTO_CHUNKS
    link: comm.LinkSpec | None = None  # an emulated link under the all-reduces
    dtype: torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # cpu | cuda; None: cuda where available
    tokens: torch.Tensor | None = None  # (batch, seq_len) prompt ids; None: random
    # A serving batch, packed into one token stream over paged KV caches: ragged prompts (1-D id tensors), or
    # the lengths of random ones; a shared prefix of cached_prefix random tokens, cached before the timed
    # prefill, that every request continues (then --tokens rows or --batch x --seq-len random prompts follow
    # it); block_size tokens per KV page.
    prompts: list | None = None
    prompt_lens: list | None = None
    cached_prefix: int = 0
    block_size: int = 16
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


@dataclass(frozen=True)
class _Resolved:
    device: str
    dtype: torch.dtype
    folder: Path
    args: ModelArgs
    split: ChunkSplit | None  # the user's, or None where the planner chooses


# --- validation before any rank starts ---
def resolve(cfg: PrefillConfig) -> _Resolved:
    """Check the configuration against the machine, the model and the prompt before any rank starts."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if cfg.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {cfg.tp}")
    if device == "cuda" and cfg.tp > torch.cuda.device_count() and "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp {cfg.tp} needs {cfg.tp} GPUs; {torch.cuda.device_count()} visible")
    if cfg.mode not in ("serial", "iso", "both"):
        raise ValueError(f"--mode must be serial, iso or both, got {cfg.mode!r}")
    if cfg.batch < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.generate < 0:
        raise ValueError("--batch and --repeats must be >= 1; --warmup and --generate >= 0")
    folder = checkpoint.model_folder(cfg.model)
    args = ModelArgs.from_hf_config(models.read_config(folder))
    tp.check_divisible(args, cfg.tp)
    for ids in [cfg.tokens] if cfg.tokens is not None else cfg.prompts or []:
        if ids.min() < 0 or ids.max() >= args.vocab_size:
            raise ValueError(f"--tokens: ids must lie in [0, {args.vocab_size}), got [{ids.min()}, {ids.max()}]")
    lens = request_lens(cfg) or [_seq_len(cfg)]
    if min(lens) < 1:
        raise ValueError(f"--seq-len and --prompt-lens must be >= 1, got {min(lens)}")
    longest = cfg.cached_prefix + max(lens)
    if longest + cfg.generate > args.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus {cfg.generate} generated exceeds the model's "
                         f"{args.max_seq_len} positions")
    _check_packing(cfg)
    split = requested_split(cfg, sum(lens))  # rejects splits outside the prompt (of a batch: its stream)
    return _Resolved(device, cfg.dtype or (torch.bfloat16 if device == "cuda" else torch.float32), folder, args,
                     split)


def _seq_len(cfg):
    return cfg.tokens.shape[1] if cfg.tokens is not None else cfg.seq_len


def request_lens(cfg):
    """New tokens per request of a packed serving batch, or None for an equal-length batch."""
    if cfg.prompts is not None:
        return [len(prompt) for prompt in cfg.prompts]
    if cfg.prompt_lens is not None:
        return list(cfg.prompt_lens)
    if cfg.cached_prefix:
        return [_seq_len(cfg)] * (cfg.tokens.shape[0] if cfg.tokens is not None else cfg.batch)
    return None


def _check_packing(cfg):
    if cfg.prompts is not None and (cfg.prompt_lens is not None or cfg.tokens is not None):
        raise ValueError("give the prompts once: ragged --tokens or --prompt-lens")
    if cfg.cached_prefix < 0:
        raise ValueError(f"--cached-prefix must be >= 0, got {cfg.cached_prefix}")
    if cfg.block_size not in [1 << k for k in range(4, 9)]:
        raise ValueError(f"--block-size must be a power of two in 16..256, got {cfg.block_size}")


def requested_split(cfg, seq_len) -> ChunkSplit | None:
    """The user's ChunkSplit (``split`` and/or ``chunks``), or None where the planner chooses."""
    if cfg.chunks is not None:
        if cfg.chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {cfg.chunks}")
        if seq_len < cfg.chunks:
            raise ValueError(f"a prompt of {seq_len} tokens is shorter than --chunks {cfg.chunks}")
    if cfg.split is None:
        return None
    if cfg.chunks not in (None, 2):
        raise ValueError("--split INDEX|FRACTION gives two chunks; use --split auto with --chunks N")
    try:
        return ChunkSplit.at(seq_len, cfg.split)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None


# --- per-rank job ---
def prefill_rank(rank, world_size, cfg: PrefillConfig, job: _Resolved) -> PrefillReport | None:
    """One rank of the prefill job (``job``: ``resolve(cfg)``); rank 0 returns the report."""
    with torch.inference_mode():
        prefill, compute_only_s = open_prefill(rank, world_size, cfg, job)
        choice = choose_split(prefill, job.split, compute_only_s)
        logits, runs, traces = _timed_runs(prefill, choice.split, show_progress=rank == 0)
        report = _report(prefill, choice, compute_only_s, logits, runs, traces)
        report.generated = _greedy_decode(prefill, logits[_decode_from(cfg)], cfg.generate)
    prefill.close()
    report.lanes = _gathered_lanes(traces) if cfg.trace else None
    # Leave together: a rank that exits while a peer's gloo pair still expects traffic makes that peer's
    # transport thread abort ("Connection reset by peer"), seen under torchrun.
    dist.barrier()
    if rank != 0:
        return None
    if cfg.save_logits:
        report.logits = {mode: prefill.per_request(out) if prefill.packed else out.float().cpu()
                         for mode, out in logits.items() if mode != "serial-chunks"}
    return report


def open_prefill(rank, world_size, cfg: PrefillConfig, job: _Resolved):
    """(this rank's ``Prefill``: model shard, prompt, communicator; the no-communication time of the unsplit
    prefill, the slowest rank's), in an initialised process group, under ``torch.inference_mode``."""
    if job.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.manual_seed(cfg.seed)
    model = checkpoint.load_checkpoint(job.folder, rank=rank, world_size=world_size, device=job.device,
                                       dtype=job.dtype)
    # The real all-reduce, opened first: a cached prefix is prefilled through it, untimed.
    base = comm.make_communicator(cfg.comm_backend) if cfg.tp > 1 or cfg.link else None
    if request_lens(cfg):
        prefill = _serving_batch(cfg, model, job, base)
    else:
        tokens = cfg.tokens
        if tokens is None:
            tokens = torch.randint(0, job.args.vocab_size, (cfg.batch, cfg.seq_len))
        prefill = Prefill(cfg, model, tokens.to(job.device), job.device, job.dtype)
        model.setup_caches(prefill.batch, prefill.seq_len + cfg.generate)
    # The floor of any schedule, and what a ratio link is derived from.
    compute_only_s = launch.max_over_ranks(median_seconds(lambda: prefill.run(None, "serial"), job.device))
    prefill.communicator = _with_link(prefill, base, compute_only_s)
    return prefill, compute_only_s


def _serving_batch(cfg, model, job, communicator):
    """The packed prefill of cfg's requests over fresh paged caches, after their shared prefix (if any) was
    prefilled into the caches through ``communicator``."""
    vocab, device = job.args.vocab_size, job.device
    if cfg.prompts is not None:
        prompts = cfg.prompts
    elif cfg.tokens is not None:
        prompts = list(cfg.tokens)
    else:
        prompts = [torch.randint(0, vocab, (n,)) for n in request_lens(cfg)]
    prefix = torch.randint(0, vocab, (cfg.cached_prefix,))

    def pages(n):
        return -(-n // cfg.block_size)

    lens = [cfg.cached_prefix + len(prompt) + cfg.generate for prompt in prompts]
    cache = model.setup_paged_caches(sum(map(pages, lens)) + pages(cfg.cached_prefix), max(lens),
                                     block_size=cfg.block_size)
    prefixes = None
    if cfg.cached_prefix:
        shared = batch.cache_prefix(model, cache, prefix.to(device), communicator)
        prefixes = [(shared, cfg.cached_prefix)] * len(prompts)
    tokens, packed = batch.add_prompts(cache, [prompt.to(device) for prompt in prompts], prefixes)
    return Prefill(cfg, model, tokens, device, job.dtype, packed=packed, cache=cache)


@dataclass
class Prefill:
    """One rank's prefill: the model shard, the prompt, and the TP group's communicator (None at TP=1
    without a link)."""

    cfg: PrefillConfig
    model: object
    tokens: torch.Tensor
    device: str
    dtype: torch.dtype
    communicator: object = None
    packed: PackedBatch | None = None  # a serving batch: its requests in the stream ``tokens`` (1, total)
    cache: PagedCache | None = None  # and the pages that hold their K/V

    @property
    def batch(self):
        return self.tokens.shape[0]

    @property
    def seq_len(self):
        return self.tokens.shape[1]

    @property
    def shape(self) -> planning.PrefillShape:
        """What planning needs to know of this prefill."""
        return planning.PrefillShape(self.model.args.n_layer, self.model.args.dim, self.batch, self.dtype.itemsize)

    def run(self, split, mode, timeline=None):
        """Logits of the prompt in the chunks of ``split`` (None: unsplit) under schedule ``mode``."""
        return schedule.forward(self.model, self.tokens, self.communicator, split, start=self.packed or 0,
                                schedule=mode, timeline=timeline, row_signal_rows=self.cfg.row_signal or None)

    def timed_run(self, split, mode):
        """``run`` started in step on every rank and traced (``metrics.traced_run``: logits, the slowest rank's
        seconds, intervals), then the communicator's failure agreement, outside the timed region."""
        result = traced_run(lambda timeline: self.run(split, mode, timeline), self.device)
        schedule.settle(self.communicator)
        return result

    def per_request(self, logits):
        """Logits (batch, seq, vocab) as a list of (len_i, vocab) fp32 CPU tensors, one per prompt."""
        rows = self.packed.unpack(logits[0]) if self.packed is not None else list(logits)
        return [row.float().cpu() for row in rows]

    def close(self):
        if self.communicator is not None:
            self.communicator.close()


def _with_link(prefill, base, compute_only_s):
    """The TP group's communicator: ``base`` (None at TP=1 without a link), behind the emulated link
    ``cfg.link`` asks for."""
    cfg, args = prefill.cfg, prefill.model.args
    if cfg.link is None:
        return base
    per_block = prefill.batch * prefill.seq_len * args.dim * prefill.dtype.itemsize
    link = cfg.link.resolve(compute_only_s, per_block, 2 * args.n_layer, cfg.tp)
    return comm.EmulatedCommunicator(base, link)


def choose_split(prefill, requested, compute_only_s) -> planning.SplitChoice:
    """The ISO chunks (``requested``: the user's, else the split trial's), the same on every rank, and the
    fitted costs."""
    costs, cfg, seq_len = measure.fitted_costs(prefill, compute_only_s), prefill.cfg, prefill.seq_len
    if requested is not None:
        return planning.SplitChoice(requested, "given", costs)
    if prefill.communicator is None and cfg.chunks is None:
        return planning.SplitChoice(ChunkSplit((seq_len,)), "off", costs)  # no all-reduce to hide: chunks only cost
    # A serving batch is not calibrated (its attention is per request): even splits of up to four chunks race.
    even_only_chunks = planning.policy.MAX_AUTO_CHUNKS if prefill.packed is not None else 2
    return planning.split_trial(costs, prefill.shape, seq_len, lambda split: prefill.timed_run(split, "iso")[1],
                                measure.cache_key(prefill, kind="split-trial"), chunks=cfg.chunks,
                                even_only_chunks=even_only_chunks, refresh=cfg.recalibrate, share=launch.broadcast,
                                writer=dist.get_rank() == 0)


def _timed_runs(prefill, split, show_progress):
    """({mode: logits}, {mode: seconds per timed run}, {mode: timeline rows per timed run}).

    "serial-chunks" (serial over the ISO chunks) is timed beside the two schedules when both run: its compute
    stream is the chunked schedule's own compute, which the bound needs (on CPU the attention reference does
    less work in chunks than unsplit), and its logits must equal ISO's bit for bit.
    """
    cfg = prefill.cfg
    modes = ["serial", "iso", "serial-chunks"] if cfg.mode == "both" else [cfg.mode]
    schedules = {"serial": (ChunkSplit((prefill.seq_len,)), "serial"), "iso": (split, "iso"),
                 "serial-chunks": (split, "serial")}
    traces = {mode: [] for mode in modes}
    logits = {}

    def run(i):
        mode = modes[i]
        logits[mode], elapsed, intervals = prefill.timed_run(*schedules[mode])
        traces[mode].append(intervals)
        return elapsed

    # disable=None: no bar when stderr is not a terminal (logs, tests)
    bar = tqdm(total=cfg.warmup + cfg.repeats, desc="prefill runs", leave=False,
               disable=None if show_progress else True)
    with bar:  # interleaved rounds, so drift in machine load hits every schedule alike
        seconds = planning.timed_rounds(run, len(modes), cfg.repeats, warmup=cfg.warmup, after_round=bar.update)
    return logits, dict(zip(modes, seconds, strict=True)), {mode: rows[cfg.warmup:] for mode, rows in traces.items()}


def _report(prefill, choice, compute_only_s, logits, runs, traces) -> PrefillReport:
    """The report of the timed runs; the overlap metrics and the logits' agreement when both schedules ran."""
    communicator, costs = prefill.communicator, choice.costs
    link = getattr(communicator, "link", None)
    predicted = planning.predict(costs, prefill.shape, choice.split) if costs else None
    packed = prefill.packed
    report = PrefillReport(
        tp=prefill.cfg.tp, seq_len=prefill.seq_len, batch=len(packed.q_lens) if packed else prefill.batch,
        device=device_name(prefill.device), dtype=str(prefill.dtype),
        comm_backend=getattr(communicator, "inner", communicator).name if communicator else "none",
        link=dataclasses.asdict(link) if link is not None else None, bounds=choice.split.bounds(),
        compute_only_ms=compute_only_s * 1e3,
        predicted_serial_ms=predicted.serial_s * 1e3 if predicted else math.nan,
        predicted_iso_ms=predicted.iso_s * 1e3 if predicted else math.nan,
        runs_ms={mode: [t * 1e3 for t in seconds] for mode, seconds in runs.items()},
        split_source=choice.source, trial=choice.trial, trial_ms=choice.trial_s * 1e3,
        trial_verdict=choice.verdict, trial_default=choice.default.ends if choice.default else None,
        model_correction=dataclasses.asdict(choice.correction),
        requests=_requests(packed, choice.split, prefill.cfg.cached_prefix) if packed else None)
    if prefill.cfg.mode == "both":
        report.overlap = overlap_metrics(report.serial_ms, report.iso_ms, traces,
                                         has_comm=report.comm_backend != "none")
        report.iso_equals_serial_same_chunks = bool(torch.equal(logits["serial-chunks"], logits["iso"]))
        scale = logits["serial"].abs().max().item()
        report.max_abs_diff = (logits["iso"] - logits["serial"]).abs().max().item()
        report.agree = report.max_abs_diff <= AGREEMENT_RTOL[prefill.dtype] * (1 + scale)
    return report


def _requests(packed, split, cached_prefix):
    """Per request of a serving batch: its lengths, its tokens' place in the stream and the chunks they fall in."""
    bounds = split.bounds()
    return [dict(cached_prefix=cached_prefix, new_tokens=b - a, stream=[a, b],
                 chunks=[i for i, (lo, hi) in enumerate(bounds) if lo < b and a < hi])
            for a, b in itertools.pairwise(packed.cu_seqlens)]


def _decode_from(cfg):
    """The schedule whose prefill leaves the KV cache the decode continues from: the last one run."""
    return "serial-chunks" if cfg.mode == "both" else cfg.mode


def _greedy_decode(prefill, prefill_logits, steps):
    """Plain greedy decode from the KV cache the prefill filled (ISO is a prefill technique); None for 0 steps."""
    if steps == 0:
        return None
    if prefill.packed is not None:
        first = torch.stack([rows[-1] for rows in prefill.packed.unpack(prefill_logits[0])]).argmax(-1)
        pages = dict(cache=prefill.cache, requests=prefill.packed.requests)
    else:
        first, pages = prefill_logits[:, -1].argmax(-1), dict(position=prefill.seq_len)
    fed, logits = batch.greedy_decode(prefill.model, first, steps - 1, prefill.communicator, **pages)
    return torch.cat([fed, logits[:, -1:].argmax(-1) if steps > 1 else first[:, None]], dim=1).tolist()


def _gathered_lanes(traces):
    """{(schedule, rank): timeline rows of its last timed run} of every rank, on rank 0 (None elsewhere)."""
    lanes = {(mode, dist.get_rank()): rows[-1] for mode, rows in traces.items() if mode != "serial-chunks"}
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, lanes)
    return {key: rows for per_rank in every_rank for key, rows in per_rank.items()}


# --- launching ---
def run(cfg: PrefillConfig):
    """Validate, start the ranks (or join torchrun's group) and return rank 0's report."""
    job = resolve(cfg)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and not dist.is_initialized():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world_size != cfg.tp:
            raise ValueError(f"--tp {cfg.tp} differs from torchrun's WORLD_SIZE {world_size}")
        if job.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if job.device == "cuda" else "gloo")
        try:
            return prefill_rank(rank, world_size, cfg, job)
        finally:
            dist.destroy_process_group()
    return launch.spawn_ranks(prefill_rank, cfg.tp, args=(cfg, job), device_type=job.device,
                              timeout_s=cfg.timeout_s)[0]
