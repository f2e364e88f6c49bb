"""The prefill job's report: one typed record that ``cli`` prints, ``--json`` writes (``to_json``) and the
benchmarks read."""

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from .metrics import OverlapMetrics, quantiles, round_reductions


@dataclass(frozen=True)
class TrialCandidate:
    """One plan the split trial timed: its chunk ends, the calibrated model's prediction (before the trial
    corrected it) and the measured median over its timed rounds (more for the race's finalists)."""

    ends: tuple
    predicted_iso_ms: float
    measured_iso_ms: float
    rounds: int


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
    plan: str = "given"  # where the split came from: "given" (by the user), "trial" (timed now), "cached"
    # (an earlier trial's) or "off" (no communication to hide, so the prompt stays whole)
    trial: list = field(default_factory=list)  # TrialCandidate per split the trial timed
    trial_ms: float = 0.0  # what the trial cost
    model_correction: dict = field(default_factory=dict)  # costmodel.PlanCorrection the trial fitted
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
        out.update(plan=self.plan, trial=[dataclasses.asdict(c) for c in self.trial], trial_ms=self.trial_ms,
                   model_correction=self.model_correction)
        if self.requests is not None:
            out["requests"] = self.requests
        out["generated"] = self.generated
        return out
