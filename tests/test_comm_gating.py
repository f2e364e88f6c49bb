"""When the nccl-ext communicator may start: the pure predicate, driven on CPU through monkeypatch
(vLLM style), including the one state in which it says yes."""

import types

import pytest
import torch
import torch.distributed as dist

from iso_kernels import _ext
from iso_kernels.comm import nccl_ext

FAKE_EXT = types.SimpleNamespace(name="fake _C", device_count=lambda: 1)


@pytest.fixture
def startable(monkeypatch):
    """Everything the predicate asks for is present: _C, a CUDA device, an initialised group of 2."""
    monkeypatch.delenv("ISO_KERNELS_DISABLE_NATIVE_COMM", raising=False)
    monkeypatch.setattr(_ext, "load", lambda: FAKE_EXT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    return monkeypatch


def test_starts_when_everything_is_present(startable):
    assert nccl_ext.nccl_ext_unavailable_reason("cuda") is None
    assert nccl_ext.nccl_ext_unavailable_reason(torch.device("cuda", 1), world_size=2) is None


@pytest.mark.parametrize("value", ["1", "yes"])
def test_environment_switch_disables_it(startable, value):
    startable.setenv("ISO_KERNELS_DISABLE_NATIVE_COMM", value)
    assert "ISO_KERNELS_DISABLE_NATIVE_COMM" in nccl_ext.nccl_ext_unavailable_reason("cuda")


@pytest.mark.parametrize("value", ["", "0"])
def test_environment_switch_off_means_enabled(startable, value):
    startable.setenv("ISO_KERNELS_DISABLE_NATIVE_COMM", value)
    assert nccl_ext.nccl_ext_unavailable_reason("cuda") is None


def test_missing_extension_gives_the_loader_reason(startable):
    startable.setattr(_ext, "load", lambda: None)
    startable.setattr(_ext, "ext_reason", lambda: "the build skipped it: no nvcc")
    reason = nccl_ext.nccl_ext_unavailable_reason("cuda")
    assert "iso_kernels._C" in reason and "no nvcc" in reason


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_non_cuda_device_is_refused(startable, device):
    assert "not a CUDA device" in nccl_ext.nccl_ext_unavailable_reason(device)


def test_no_visible_gpu_is_refused(startable):
    startable.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA device" in nccl_ext.nccl_ext_unavailable_reason("cuda")


def test_extension_without_devices_is_refused_although_torch_sees_one(startable):
    """A cu12 torch can see GPUs that the CUDA 13 runtime inside _C cannot use (driver older than r580)."""
    no_devices = types.SimpleNamespace(device_count=lambda: 0,
                                       build_info=lambda: {"cuda_runtime": 13000, "driver": 12080})
    startable.setattr(_ext, "load", lambda: no_devices)
    reason = nccl_ext.nccl_ext_unavailable_reason("cuda")
    assert "sees no CUDA device although torch does" in reason and "12080" in reason and "r580" in reason


def test_uninitialised_process_group_is_refused(startable):
    startable.setattr(dist, "is_initialized", lambda: False)
    assert "not initialised" in nccl_ext.nccl_ext_unavailable_reason("cuda")


def test_world_size_mismatch_is_refused(startable):
    reason = nccl_ext.nccl_ext_unavailable_reason("cuda", world_size=4)
    assert "world_size=4" in reason and "size 2" in reason


def test_this_machine_gets_a_reason_not_an_error():
    """On the real state of a CPU machine the predicate answers (with a reason) instead of raising."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert nccl_ext.nccl_ext_unavailable_reason("cuda") is not None
    assert nccl_ext.nccl_ext_unavailable_reason("cpu") is not None


def _gloo_rank_refuses_nccl_ext(rank, world_size):
    from iso_kernels import comm

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nccl-ext communicator cannot start: torch sees no CUDA"):
            nccl_ext.NcclExtCommunicator()
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        comm.make_communicator("nccl-ext")
    with comm.make_communicator("auto", verbose=False) as fallback:
        return fallback.name


@pytest.mark.slow
def test_gloo_group_falls_back_to_torch():
    from iso_kernels import launch

    assert launch.spawn_ranks(_gloo_rank_refuses_nccl_ext, 1, timeout_s=60) == ["torch"]


class _NothingMayBeEnqueued:
    def __getattr__(self, name):
        raise AssertionError(f"OverlapComm.{name} was reached before the arguments were validated")


@pytest.fixture
def unvalidated_comm():
    """An NcclExtCommunicator shell on CPU tensors: only the argument checks can run."""
    comm = nccl_ext.NcclExtCommunicator.__new__(nccl_ext.NcclExtCommunicator)
    comm.device, comm._comm = torch.device("cpu"), _NothingMayBeEnqueued()
    return comm


BAD_STARTS = [  # (kwargs builder, exception, words in the message)
    (lambda x, s: {"after": object()}, ValueError, "after= needs ready_flag"),
    (lambda x, s: {"ready_flag": (s, 0, 1), "after": "event"}, TypeError, "after must be a torch.cuda.Event"),
    (lambda x, s: {"ready_flag": (s[::2], 0, 1)}, ValueError, "contiguous"),
    (lambda x, s: {"ready_flag": (s.float(), 0, 1)}, ValueError, "int32"),
    (lambda x, s: {"ready_flag": (s, 4, 1)}, ValueError, "index"),
    (lambda x, s: {"ready_flag": (s, 0, 0)}, ValueError, "target"),
]


@pytest.mark.parametrize("kwargs, error, words", BAD_STARTS)
def test_bad_start_arguments_fail_before_enqueuing(unvalidated_comm, kwargs, error, words):
    x, signal = torch.ones(5), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(error, match=words):
        unvalidated_comm.all_reduce_start(x, **kwargs(x, signal))


def test_non_contiguous_tensor_is_refused(unvalidated_comm):
    with pytest.raises(ValueError, match="contiguous"):
        unvalidated_comm.all_reduce_start(torch.ones(4, 4).T)


# --- torch's NCCL backend: a high-priority stream where torch offers it ---
def test_process_group_options_ask_nccl_for_a_high_priority_stream(monkeypatch):
    from iso_kernels import launch

    class FakeOptions:
        def __init__(self, is_high_priority_stream=False):
            self.is_high_priority_stream = is_high_priority_stream

    monkeypatch.delattr(launch.dist, "ProcessGroupNCCL", raising=False)
    assert launch.process_group_options("nccl") is None  # a CPU build of torch has no NCCL
    monkeypatch.setattr(launch.dist, "ProcessGroupNCCL", type("ProcessGroupNCCL", (), {"Options": FakeOptions}),
                        raising=False)
    assert launch.process_group_options("nccl").is_high_priority_stream is True
    assert launch.process_group_options("gloo") is None
