"""The prefill job's report: one typed record, its printed form (``format``, what ``cli`` prints) beside its
JSON form (``to_json``, what ``--json`` writes), read by the benchmarks too."""

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from .metrics import OverlapMetrics, quantiles, round_reductions


@dataclass
class PrefillReport:
    """Rank 0's account of one prefill job. ms are the slowest rank's; ``runs_ms`` holds every timed run per
    schedule: "serial" (unsplit), "iso" (ISO over ``bounds``) and, when both ran, "serial-chunks" (serial over
    ISO's chunks, whose logits must equal ISO's bit for bit)."""

    tp: int
    seq_len: int
    batch: int
    device: str  # "cpu x<cores>" or the GPU's name
    dtype: str
    comm_backend: str  # "none" at TP 1 without a link
    link: dict | None  # the emulated link's LinkModel fields, or None
    bounds: list  # ISO's chunks as (start, end) token positions
    compute_only_ms: float  # the unsplit prefill without any all-reduce
    predicted_serial_ms: float  # nan where the prompt was too short to calibrate on
    predicted_iso_ms: float
    runs_ms: dict
    overlap: OverlapMetrics | None = None  # when both schedules ran
    max_abs_diff: float | None = None  # max |iso - serial| over the logits, when both ran
    agree: bool | None = None  # max_abs_diff within the dtype's tolerance
    iso_equals_serial_same_chunks: bool | None = None
    split_source: str = "given"  # where the split came from: "given" (by the user), "planned" (the policy's,
    # untimed), "trial" (timed now), "cached" (an earlier trial's) or "off" (no communication to hide)
    trial: list = field(default_factory=list)  # TrialCandidate per split the trial timed
    trial_ms: float = 0.0  # what the trial cost
    trial_verdict: str = ""  # why the trial chose the split
    trial_default: tuple | None = None  # the chunk ends the trial kept unless a candidate beat them
    model_correction: dict = field(default_factory=dict)  # ``planning.PlanCorrection`` the trial fitted
    generated: list | None = None  # greedy token ids after the prompt, per batch row or request
    # A serving batch: per request its cached_prefix, new_tokens, stream [a, b) and the chunks it falls in
    requests: list | None = None
    lanes: dict | None = None  # {(schedule, rank): timeline rows of its last run} with --trace
    # {schedule: fp32 logits (batch, seq, vocab), or of a serving batch a (len_i, vocab) per request}
    logits: dict | None = None  # with --save-logits

    @property
    def reduction_spread(self):
        """(p50, p20, p80) of the per-round reductions 1 - iso / serial (serial and ISO run side by side in every
        round); None unless both schedules ran."""
        if "serial" not in self.runs_ms or "iso" not in self.runs_ms:
            return None
        return quantiles(round_reductions(self.runs_ms["serial"], self.runs_ms["iso"]))

    @property
    def difference(self):
        """"gain", "loss", or "none measurable" where the rounds' spread of the reduction ([p20, p80]) holds 0;
        None unless both schedules ran."""
        spread = self.reduction_spread
        if spread is None:
            return None
        _, low, high = spread
        return "gain" if low > 0 else "loss" if high < 0 else "none measurable"

    @property
    def chunks(self):
        return len(self.bounds)

    @property
    def split(self):
        """The second chunk's start for two chunks, else every chunk end (the JSON's ``split``)."""
        ends = [end for _, end in self.bounds]
        return ends[0] if len(ends) == 2 else ends

    def median_ms(self, schedule):
        return statistics.median(self.runs_ms[schedule]) if schedule in self.runs_ms else math.nan

    @property
    def serial_ms(self):
        return self.median_ms("serial")

    @property
    def iso_ms(self):
        return self.median_ms("iso")

    def format(self) -> str:
        """The report as ``python -m iso_kernels prefill`` prints it (``to_json`` is its --json form)."""
        return format_report(self)

    def to_json(self) -> dict:
        """The report as flat JSON keys: ``<schedule>_ms`` (median) and ``<schedule>_runs_ms`` per schedule,
        the overlap metrics' fields, the agreement checks; lanes and logits are written by their own options."""
        out = dict(tp=self.tp, seq_len=self.seq_len, batch=self.batch, device=self.device, dtype=self.dtype,
                   comm_backend=self.comm_backend, link=self.link, split=self.split, chunks=self.chunks,
                   bounds=self.bounds, compute_only_ms=self.compute_only_ms,
                   predicted_serial_ms=self.predicted_serial_ms, predicted_iso_ms=self.predicted_iso_ms)
        for schedule, runs in self.runs_ms.items():
            out[f"{schedule}_ms"] = self.median_ms(schedule)
            out[f"{schedule}_runs_ms"] = runs
        if self.overlap is not None:
            out.update(dataclasses.asdict(self.overlap))
        if self.reduction_spread is not None:
            _, out["reduction_p20"], out["reduction_p80"] = self.reduction_spread
            out["difference"] = self.difference
        if self.agree is not None:
            out.update(iso_equals_serial_same_chunks=self.iso_equals_serial_same_chunks,
                       max_abs_diff=self.max_abs_diff, agree=self.agree)
        out.update(split_source=self.split_source, trial=[dataclasses.asdict(c) for c in self.trial],
                   trial_ms=self.trial_ms, trial_verdict=self.trial_verdict, trial_default=self.trial_default,
                   model_correction=self.model_correction)
        if self.requests is not None:
            out["requests"] = self.requests
        out["generated"] = self.generated
        return out


# --- the printed report ---
DIFFERENCE_WORDS = {"gain": "ISO faster", "loss": "ISO slower", "none measurable": "no measurable difference"}


def _efficiency(report, reduction):
    """The overlap efficiency a reduction of the median serial time means, against the same bound."""
    achievable = report.serial_ms - report.overlap.bound_ms
    return reduction * report.serial_ms / achievable if achievable > 0 else math.nan


def format_report(report: PrefillReport) -> str:
    """The report as ``python -m iso_kernels prefill`` prints it."""
    lines = [f"iso prefill: tp={report.tp} seq_len={report.seq_len} batch={report.batch} "
             f"device={report.device} dtype={report.dtype} comm={report.comm_backend}"
             + (f" link={report.link['name']}" if report.link else ""),
             f"chunks={report.chunks} bounds={report.bounds}"]
    lines += _request_lines(report.requests or [])
    if report.split_source == "cached":
        lines.append("split                the split trial's choice for this bucket, cached (--recalibrate times "
                     "the candidates again)")
    elif report.trial:
        lines.append(f"split trial          {len(report.trial)} candidates in {report.trial_ms / 1e3:.2f} s "
                     "(ISO ms: measured / predicted by the calibration, timed rounds)")
        lines += [f"  {list(c.ends)!s:<22}{c.measured_iso_ms:>9.2f} / {c.predicted_iso_ms:<9.2f}{c.rounds:>3}"
                  for c in report.trial]
        default = f" (policy's plan {list(report.trial_default)})" if report.trial_default else ""
        lines.append(f"trial's choice       {[end for _, end in report.bounds]}: {report.trial_verdict}{default}")
        correction = report.model_correction
        if not math.isnan(report.predicted_iso_ms):
            lines.append(f"model correction     blocks {1e3 * correction['block_offset_s']:+.3f} ms each, compute"
                         f" x {correction['compute_scale']:.3f} (fitted to the trial; the predictions below)")
    lines.append(f"{'schedule':<10}{'ms (median)':>14}{'predicted ms':>15}")
    for name, predicted in (("serial", report.predicted_serial_ms), ("iso", report.predicted_iso_ms)):
        if name in report.runs_ms:
            lines.append(f"{name:<10}{report.median_ms(name):>14.2f}{predicted:>15.2f}")
    overlap = report.overlap
    if overlap is not None:
        _, low, high = report.reduction_spread
        lines += [
            f"reduction            {100 * overlap.reduction:6.1f} %   (1 - iso / serial; per round [p20, p80] "
            f"[{100 * low:+.1f}, {100 * high:+.1f}] % over {len(report.runs_ms['iso'])} rounds: "
            f"{DIFFERENCE_WORDS[report.difference]})",
            f"compute / comm (ms)  {overlap.compute_ms:.2f} / {overlap.comm_ms:.2f}   "
            f"(per stream, serial run; no-comm prefill {report.compute_only_ms:.2f})",
            f"bound (ms)           {overlap.bound_ms:.2f}   (max(chunked compute {overlap.chunked_compute_ms:.2f}"
            " + tail, comm + head))",
            f"overlap efficiency   {overlap.overlap_efficiency:.2f}   ((serial - iso) / (serial - bound); at the "
            f"reduction's p20, p80: {_efficiency(report, low):.2f}, {_efficiency(report, high):.2f})",
            f"logits               max |iso - serial| = {report.max_abs_diff:.3g} "
            f"({'agree' if report.agree else 'DISAGREE'}); iso == serial on the same chunks: "
            f"{report.iso_equals_serial_same_chunks}",
        ]
    if report.generated:
        lines.append(f"generated            {report.generated}")
    return "\n".join(lines)


# A serving batch lists this many requests, then a count of the rest (--json has them all).
REQUEST_LINES = 8


def _request_lines(requests):
    lines = [f"request {i:<3}          {r['cached_prefix']} cached + {r['new_tokens']} new tokens, stream "
             f"[{r['stream'][0]}, {r['stream'][1]}), chunks {r['chunks']}" for i, r in enumerate(requests)]
    return lines[:REQUEST_LINES] + ([f"... {len(lines) - REQUEST_LINES} more requests"]
                                    if len(lines) > REQUEST_LINES else [])
