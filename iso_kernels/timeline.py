"""Per-rank timelines of a prefill: compute blocks and all-reduces, per chunk and layer.

On CPU spans are host clocks (``time.perf_counter``) and an all-reduce's interval is when the link was busy
(the emulated link knows it exactly; for gloo the communicator's watcher thread sees each one end). On GPU
spans are CUDA events on the compute stream and, where the communicator records them, on its comm stream.
Export: Chrome trace JSON (Perfetto, chrome://tracing) and a PNG Gantt chart with one lane per stream.
"""

import contextlib
import json
import time

import torch


class Timeline:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._compute = []  # (kind, chunk, layer, start, end): floats (CPU) or CUDA events (GPU)
        self._comm = []  # (kind, chunk, layer, pending)
        self._origin = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextlib.contextmanager
    def span(self, kind, chunk, layer):
        start = self._now()
        yield
        self._compute.append((kind, chunk, layer, start, self._now()))

    def comm(self, pending, kind, chunk, layer):
        self._comm.append((kind, chunk, layer, pending))

    def _ms(self, mark):
        if self.cuda:
            return self._origin.elapsed_time(mark)
        return (mark - self._origin) * 1e3

    def intervals(self):
        """Dicts with stream ("compute"/"comm"), kind, chunk, layer, start_ms, end_ms (relative to creation)."""
        if self.cuda:
            torch.cuda.synchronize()
        rows = [dict(stream="compute", kind=k, chunk=c, layer=layer, start_ms=self._ms(s), end_ms=self._ms(e))
                for k, c, layer, s, e in self._compute]
        for kind, chunk, layer, pending in self._comm:
            marks = getattr(pending, "events", None) if self.cuda else getattr(pending, "interval", None)
            if marks is not None:
                rows.append(dict(stream="comm", kind=f"all-reduce {kind}", chunk=chunk, layer=layer,
                                 start_ms=self._ms(marks[0]), end_ms=self._ms(marks[1])))
        return rows


def busy_ms(rows, stream):
    """Total milliseconds of ``stream``'s intervals in ``rows``."""
    return sum(r["end_ms"] - r["start_ms"] for r in rows if r["stream"] == stream)


def chrome_trace(lanes):
    """Chrome trace events for ``{(label, rank): intervals}``: one process per label/rank, one thread per stream."""
    events = []
    for pid, ((label, rank), rows) in enumerate(sorted(lanes.items())):
        events.append(dict(name="process_name", ph="M", pid=pid, args={"name": f"{label} rank {rank}"}))
        for tid, stream in enumerate(("compute", "comm")):
            events.append(dict(name="thread_name", ph="M", pid=pid, tid=tid, args={"name": stream}))
        for row in rows:
            events.append(dict(name=f"{row['kind']} c{row['chunk']}", cat=row["stream"], ph="X", pid=pid,
                               tid=0 if row["stream"] == "compute" else 1, ts=row["start_ms"] * 1e3,
                               dur=max(row["end_ms"] - row["start_ms"], 0.0) * 1e3,
                               args={"layer": row["layer"], "chunk": row["chunk"]}))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path, lanes):
    with open(path, "w") as f:
        json.dump(chrome_trace(lanes), f)


def plot_gantt(path, lanes, title="serial vs iso prefill"):
    """PNG Gantt chart: for each (label, rank) a compute lane and a comm lane; colour = chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(lanes)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(keys)))
    colours = plt.get_cmap("tab10")
    ticks, labels = [], []
    for i, key in enumerate(keys):
        for j, stream in enumerate(("compute", "comm")):
            y = 2 * i + j
            ticks.append(y)
            labels.append(f"{key[0]} r{key[1]} {stream}")
            for row in lanes[key]:
                if row["stream"] == stream:
                    ax.barh(y, row["end_ms"] - row["start_ms"], left=row["start_ms"], height=0.8,
                            color=colours(row["chunk"] % 10), alpha=0.55 if "mlp" in row["kind"] else 0.95,
                            edgecolor="none")
    ax.set_yticks(ticks, labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the prefill started (colour: chunk; lighter: MLP)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
