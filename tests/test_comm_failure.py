"""Failure handling of the communicators, decided on CPU: the watchdog's timeout policy (its polling loop is
tested with _C in tests/test_ext.py), the cross-rank agreement over gloo (a rank that fails makes every rank
raise the same error and abort), the ``__exit__`` abort, and the row-signal warm-up pass. What needs real NCCL
or real flag waits is in tests/test_comm_nccl.py (@gpu / @multigpu)."""

import pytest
import torch

from iso_kernels import checkpoint, comm, envs, launch, schedule
from iso_kernels.comm import nccl_ext
from iso_kernels.split import ChunkSplit

BAD_TIMEOUTS = ["0", "-1", "nan", "inf", "soon"]
SLOW_LINK = comm.LinkModel("test", latency_s=1e-3, bus_bandwidth=1e12)


# --- the watchdog's timeout policy ---
def test_timeout_comes_from_the_argument_else_the_environment_else_the_default(monkeypatch):
    monkeypatch.delenv(envs.COMM_TIMEOUT_VAR, raising=False)
    assert nccl_ext.comm_timeout_s() == nccl_ext.DEFAULT_TIMEOUT_S == 600.0
    monkeypatch.setenv(envs.COMM_TIMEOUT_VAR, "42.5")
    assert nccl_ext.comm_timeout_s() == 42.5
    assert nccl_ext.comm_timeout_s(7) == 7.0


@pytest.mark.parametrize("value", BAD_TIMEOUTS)
def test_bad_timeouts_are_refused_naming_their_source(monkeypatch, value):
    monkeypatch.setenv(envs.COMM_TIMEOUT_VAR, value)
    with pytest.raises(ValueError, match=envs.COMM_TIMEOUT_VAR):
        nccl_ext.comm_timeout_s()
    with pytest.raises(ValueError, match="timeout_s"):
        nccl_ext.comm_timeout_s(value)


def test_timeout_must_outlast_the_flag_wait():
    with pytest.raises(ValueError, match="must exceed flag_timeout_s=5"):
        nccl_ext.comm_timeout_s(5.0, flag_timeout_s=5.0)
    assert nccl_ext.comm_timeout_s(5.5, flag_timeout_s=5.0) == 5.5


# --- agreement across ranks, over gloo ---
def _agreement_cases(rank, world_size):
    """The text each case raised on this rank (None when nothing was raised)."""
    failing = {"none": set(), "rank 1": {1}, "both": {0, 1}}
    outcome = {}
    for case, ranks in failing.items():
        try:
            comm.agree_on_status(f"boom on {rank}" if rank in ranks else None, what="the test communicator")
            outcome[case] = None
        except comm.CommFailure as exc:
            outcome[case] = (str(exc), exc.failures)
    return outcome


@pytest.mark.slow
def test_every_rank_raises_the_same_error_naming_the_failed_rank():
    rank0, rank1 = launch.spawn_ranks(_agreement_cases, 2, timeout_s=60)
    assert rank0 == rank1, "the ranks disagree"
    assert rank0["none"] is None
    text, failures = rank0["rank 1"]
    assert failures == {1: "boom on 1"}
    assert text == "the test communicator failed on 1 of 2 rank(s): rank 1: boom on 1"
    assert rank0["both"][1] == {0: "boom on 0", 1: "boom on 1"}


class _FakeOverlapComm:
    """Stands in for _C.OverlapComm: synchronize() fails on request; records abort/destroy."""

    def __init__(self, error=None):
        self.error, self.calls = error, []

    def synchronize(self):
        self.calls.append("synchronize")
        if self.error:
            raise RuntimeError(self.error)

    def destroy(self):
        self.calls.append("destroy")

    def abort(self):
        self.calls.append("abort")


def _nccl_ext_shell(native_comm_object, rank, world_size):
    """An NcclExtCommunicator on the current (gloo) group around a fake native communicator."""
    shell = nccl_ext.NcclExtCommunicator.__new__(nccl_ext.NcclExtCommunicator)
    shell.group, shell.rank, shell.world_size, shell.device = None, rank, world_size, torch.device("cpu")
    shell._comm = native_comm_object
    return shell


def _settle_cases(rank, world_size):
    healthy = _FakeOverlapComm()
    _nccl_ext_shell(healthy, rank, world_size).settle()
    error = "flag wait timed out on rank 1: 1 wait(s) timed out" if rank == 1 else None
    broken = _FakeOverlapComm(error)
    shell = _nccl_ext_shell(broken, rank, world_size)
    try:
        shell.settle()
        raised = None
    except comm.CommFailure as exc:
        raised = str(exc)
    with pytest.raises(RuntimeError, match="closed"):
        shell.all_reduce_start(torch.ones(2))
    return healthy.calls, broken.calls, raised


@pytest.mark.slow
def test_settle_aborts_every_rank_when_one_rank_failed():
    (healthy0, broken0, raised0), (healthy1, broken1, raised1) = launch.spawn_ranks(_settle_cases, 2,
                                                                                    timeout_s=60)
    assert healthy0 == healthy1 == ["synchronize"], "a healthy settle must neither abort nor close"
    assert broken0 == broken1 == ["synchronize", "abort"]
    assert raised0 == raised1
    assert raised0.startswith("the nccl-ext communicator failed on 1 of 2 rank(s): rank 1: flag wait timed out")


def _agreed_reason(rank, world_size, reasons):
    """Each rank believes its own reason (None: it could start nccl-ext); the group's answer."""
    nccl_ext.nccl_ext_unavailable_reason = lambda *args, **kwargs: reasons[rank]
    return nccl_ext.agreed_unavailable_reason("cuda")


def _backend_choice(rank, world_size, reasons):
    """What every rank chooses when at least one of them cannot start nccl-ext."""
    agreed = _agreed_reason(rank, world_size, reasons)
    with comm.make_communicator("auto", verbose=False) as chosen:
        name = chosen.name
    try:
        comm.make_communicator("nccl-ext")
        refused = None
    except RuntimeError as exc:
        refused = str(exc)
    return agreed, name, refused


# (what each rank believes, what they must all agree on)
DISAGREEMENTS = [
    ((None, "its driver is too old"), "rank 1: its driver is too old"),
    (("no GPU", "no GPU"), "no GPU"),
    (("no GPU", "disabled"), "rank 0: no GPU; rank 1: disabled"),
]


def _backend_choices(rank, world_size):
    return [_backend_choice(rank, world_size, reasons) for reasons, _ in DISAGREEMENTS]


@pytest.mark.slow
def test_ranks_agree_on_the_backend():
    """One rank that cannot start nccl-ext sends every rank to torch (auto) or makes every rank raise."""
    rank0, rank1 = launch.spawn_ranks(_backend_choices, 2, timeout_s=60)
    assert rank0 == rank1
    for (agreed, name, refused), (_, expected) in zip(rank0, DISAGREEMENTS, strict=True):
        assert agreed == expected and name == "torch"
        assert refused == f"nccl-ext communicator cannot start: {expected}"


@pytest.mark.slow
def test_every_rank_can_start_means_no_reason():
    assert launch.spawn_ranks(_agreed_reason, 2, args=((None, None),), timeout_s=60) == [None, None]


# --- leaving a with-block, closing, aborting ---
class _RecordingCommunicator(comm.Communicator):
    def __init__(self):
        self.group, self.rank, self.world_size, self.device = None, 0, 1, torch.device("cpu")
        self.calls = []

    def settle(self):
        self.calls.append("settle")

    def close(self):
        self.calls.append("close")

    def abort(self):
        self.calls.append("abort")


def test_with_block_closes_normally_and_aborts_when_the_body_raises():
    with _RecordingCommunicator() as normal:
        pass
    assert normal.calls == ["close"]
    with pytest.raises(KeyError):
        with _RecordingCommunicator() as failing:
            raise KeyError("the body broke")
    assert failing.calls == ["abort"]


def test_emulated_link_passes_settle_and_abort_to_its_communicator():
    inner = _RecordingCommunicator()
    emulated = comm.EmulatedCommunicator(inner, SLOW_LINK)
    emulated.settle()
    with pytest.raises(KeyError):
        with emulated:
            raise KeyError("the body broke")
    assert inner.calls == ["settle", "abort"]


def test_nccl_ext_close_and_abort_are_idempotent():
    closing = _FakeOverlapComm()
    shell = _nccl_ext_shell(closing, 0, 1)
    shell.close()
    shell.close()
    shell.abort()
    assert closing.calls == ["synchronize", "destroy"]
    aborting = _FakeOverlapComm()
    shell = _nccl_ext_shell(aborting, 0, 1)
    shell.abort()
    shell.abort()
    shell.close()
    assert aborting.calls == ["abort"]


def test_a_flag_timeout_at_close_still_frees_the_communicator():
    timed_out = _FakeOverlapComm("flag wait timed out on rank 0")
    with pytest.raises(RuntimeError, match="flag wait timed out"):
        _nccl_ext_shell(timed_out, 0, 1).close()
    assert timed_out.calls == ["synchronize", "destroy"]


# --- the schedule: settling is the caller's, warm-up before the first flag wait ---
BATCH, SEQ_LEN = 2, 37


@pytest.fixture
def tiny_model(tmp_path):
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    model = checkpoint.load_checkpoint(folder)
    model.setup_caches(BATCH, SEQ_LEN)
    return model, torch.randint(0, 512, (BATCH, SEQ_LEN)), ChunkSplit.at(SEQ_LEN, 0.5)


class _SettleCounter:
    supports_ready_flag = False

    def __init__(self):
        self.settled = 0

    def all_reduce_start(self, tensor, *, ready_flag=None, after=None):
        return comm.PendingAllReduce(tensor)

    def settle(self):
        self.settled += 1


def test_forward_leaves_settling_to_its_caller(tiny_model):
    """``forward`` never settles (a collective and a host sync, which a captured graph cannot hold); the caller
    settles once after its forwards, and ``schedule.settle`` passes over communicators without it."""
    model, tokens, split = tiny_model
    counter = _SettleCounter()
    with torch.inference_mode():
        schedule.forward(model, tokens, counter, split)
        schedule.forward(model, tokens[:, :1], counter)
    assert counter.settled == 0
    schedule.settle(counter)
    schedule.settle(None)
    schedule.settle(object())
    assert counter.settled == 1


def test_row_signal_warm_up_runs_once_and_leaves_the_results_unchanged(tiny_model, monkeypatch):
    """The pass writes the KV cache at the real pass's positions; the real pass overwrites them before reading,
    so logits are bitwise those of a run without the warm-up."""
    model, tokens, split = tiny_model
    starts = []
    monkeypatch.setattr(schedule._NoCollectives, "all_reduce_start",
                        lambda self, tensor, **kwargs: starts.append(tensor.shape) or comm.PendingAllReduce(tensor))
    with torch.inference_mode():
        plain = schedule.forward(model, tokens, None, split)
        schedule._warm_row_signal_kernels(model, tokens, split, 0, 16)
        warmed_groups = len(starts)
        schedule._warm_row_signal_kernels(model, tokens, split, 0, 16)
        after_warm_up = schedule.forward(model, tokens, None, split)
    assert warmed_groups > 0
    assert len(starts) == warmed_groups, "a second warm-up of the same shapes must do nothing"
    assert torch.equal(after_warm_up, plain)
