"""What the prefill job measures on its ranks for planning: its blocks' timings, fitted by
``planning.fit_layer_costs`` (cached per model, TP size, shape, machine and link) and scaled to the job's own
serial prefill, and the key its cached measurements are stored under."""

import dataclasses
import statistics

import torch
import torch.distributed as dist

from . import hardware, planning
from .launch import broadcast, max_over_ranks
from .metrics import device_name, median_seconds
from .split import ChunkSplit
from .timeline import busy_ms

# Calibration times blocks of seq_len/8 .. seq_len/2 tokens after prefixes up to seq_len/2; below this the
# sizes collapse and cannot separate the model's terms, so short prompts get the even split and no prediction.
MIN_CALIBRATION_TOKENS = 16


def cache_key(prefill, kind="block-costs"):
    """What a cached measurement of this prefill depends on: model, TP size, shape, machine and link."""
    cfg, communicator = prefill.cfg, prefill.communicator
    requests = len(prefill.packed.q_lens) if prefill.packed is not None else None  # of a serving batch
    return dict(kind=kind, model=cfg.model, tp=cfg.tp, batch=prefill.batch, seq_len=prefill.seq_len,
                requests=requests, cached_prefix=cfg.cached_prefix,
                device=device_name(prefill.device), dtype=str(prefill.dtype),
                threads=torch.get_num_threads(), link=str(cfg.link) if cfg.link else None,
                comm=communicator.name if communicator else None)


def fitted_costs(prefill, compute_only_s):
    """The calibrated block costs, scaled so that the model predicts this machine's whole serial prefill; None
    for a prompt too short to calibrate on, and for a serving batch. The same on every rank."""
    if prefill.seq_len < MIN_CALIBRATION_TOKENS or prefill.packed is not None:
        # A serving batch's attention is per request, which the one-sequence block model does not describe:
        # the split trial alone chooses its chunks.
        return None
    communicator, unsplit = prefill.communicator, ChunkSplit((prefill.seq_len,))
    # The block fits give the shape of the costs; the whole serial prefill measured here fixes their scale
    # (an emulated link's cost is known exactly instead, below).
    link_model = getattr(communicator, "link", None)
    serial_comm_s = 0.0
    if communicator is not None and link_model is None:
        serial_comm_s = max_over_ranks(statistics.median(
            busy_ms(prefill.timed_run(unsplit, "serial")[2], "comm") / 1e3
            for _ in range(2)))
    costs = _block_costs(prefill)
    modelled = planning.simulate_prefill(costs, prefill.shape, unsplit)
    if link_model is not None:
        # An emulated link's cost is known exactly; a fit of timed collectives would add the ranks' skew to it
        # as a spurious latency, paid once more per extra chunk.
        costs = dataclasses.replace(costs, ar_latency=link_model.latency_s, ar_bandwidth=(
            link_model.bus_bandwidth / hardware.ring_factor(communicator.traffic_world_size)))
    scale_comm = serial_comm_s > 0 and modelled.comm_s > 0
    return costs.scaled(compute=compute_only_s / modelled.compute_s,
                        comm=serial_comm_s / modelled.comm_s if scale_comm else 1.0)


def _block_costs(prefill):
    """Fit the cost model's constants to this model's blocks on this machine (cached), on rank 0's timings."""
    model, communicator, device, dtype = prefill.model, prefill.communicator, prefill.device, prefill.dtype
    layer, args, batch, seq_len = model.layers[0], model.args, prefill.batch, prefill.seq_len
    key = cache_key(prefill)
    cached = planning.load_calibration(None, key) if dist.get_rank() == 0 and not prefill.cfg.recalibrate \
        else None
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
    fit = planning.fit_layer_costs(measure_attention, measure_mlp, measure_all_reduce, token_sizes=sizes,
                                    prefix_sizes=prefixes, byte_sizes=[token_bytes * n for n in sizes],
                                    batch=batch)
    costs = broadcast(fit.costs)
    if dist.get_rank() == 0:
        planning.save_calibration(None, costs, key)
    return costs
