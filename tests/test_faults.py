"""Faults with real processes: stop signals to the CLI and to torchrun, a rank killed by a signal, a rank
blocked on a peer that stopped answering, two runs filling one fresh cache, a corrupt or unwritable cache, a
missing extra.

Every process a test starts runs in a session of its own, killed when the test ends. No bound here is a
fixed number of seconds: a job must stop faster than the same job took to start, measured in the same test
(start-up is imports, spawning, model creation and calibration, so it grows with machine load too)."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iso_kernels import checkpoint, launch, planning

pytestmark = pytest.mark.slow  # every test here starts ranks or processes

# Runs until stopped; the calibration file appearing in its fresh cache says the ranks are inside the job.
ENDLESS = ["prefill", "--model", "llama-tiny", "--seq-len", "64", "--warmup", "0", "--repeats", "1000000",
           "--comm-backend", "torch"]
QUICK = ["prefill", "--model", "llama-tiny", "--seq-len", "40", "--warmup", "0", "--repeats", "1",
         "--comm-backend", "torch", "--generate", "1"]
# How long a test waits for something that must happen (a hang shows as this, not as pytest's timeout).
PATIENCE_S = 240


def _in_child():
    # A non-interactive shell starts background jobs with SIGINT ignored, and exec keeps that: undo it. No core
    # files from the SIGSEGV test.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _stat(pid):
    """(state, ppid, session) of a live process, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3])


def _start_time(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Job:
    """``python -m <args>`` (default: iso_kernels) in its own session, with its own cache folder."""

    def __init__(self, args, cache, *, cwd, module="iso_kernels", env=None):
        self.cache = Path(cache)
        env = {**os.environ, "ISO_KERNELS_CACHE_DIR": str(cache), **(env or {})}
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                                     start_new_session=True, preexec_fn=_in_child)  # noqa: PLW1509
        self.pid = self.proc.pid

    def wait_until_inside(self):
        """Wait for the calibration file; returns the start-up time and the ranks' pids by rank."""
        deadline = time.monotonic() + PATIENCE_S
        while not (self.cache / "calibration.json").exists():
            assert self.proc.poll() is None, f"the job ended early: {self.proc.communicate()}"
            assert time.monotonic() < deadline, "the job never reached its timed loop"
            time.sleep(0.05)
        return time.monotonic() - self.started, self.ranks()

    def ranks(self):
        """rank -> pid: the launcher's spawned children, which it starts in rank order."""
        children = [pid for pid in self.session() if _stat(pid)[1] == self.pid
                    and "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
        return dict(enumerate(sorted(children, key=lambda pid: (_start_time(pid), pid))))

    def session(self):
        """Live (not zombie) processes of this job's session."""
        return [pid for pid in _pids() if (st := _stat(pid)) and st[2] == self.pid and st[0] not in "ZX"]

    def finish(self):
        out, err = self.proc.communicate(timeout=PATIENCE_S)
        return self.proc.returncode, out, err

    def assert_nothing_left(self, within_s):
        """Nothing of the session runs ``within_s`` after the job ended (multiprocessing's resource tracker
        leaves on its own once its parent has gone; a zombie no init reaps in this container is not running)."""
        deadline = time.monotonic() + within_s
        while self.session():
            assert time.monotonic() < deadline, f"left running: {self.session()}"
            time.sleep(0.05)

    def stopped_by(self, send, startup_s):
        """``send()`` (a signal or a kill), then the job's status and stderr, once it has ended and nothing of
        it is left: both must take less time than the job took to start."""
        stop = time.monotonic()
        send()
        status, _, err = self.finish()
        self.assert_nothing_left(within_s=startup_s)
        stop_s = time.monotonic() - stop
        assert stop_s < startup_s, f"stopping took {stop_s:.1f}s, starting {startup_s:.1f}s"
        return status, err

    def kill(self):
        if self.proc.poll() is None or self.session():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.communicate(timeout=PATIENCE_S)


@pytest.fixture
def jobs(tmp_path):
    started = []
    yield lambda *args, **kwargs: started.append(Job(*args, cwd=tmp_path, **kwargs)) or started[-1]
    for job in started:
        job.kill()


def _assert_clean(err):
    assert "Traceback" not in err and "leaked semaphore" not in err, err


# --- 1. stop signals ---
@pytest.mark.parametrize("signum, to_group, line", [
    (signal.SIGINT, True, "interrupted"),  # Ctrl-C in a terminal: the whole foreground group, ranks included
    (signal.SIGINT, False, "interrupted"),
    (signal.SIGTERM, False, "terminated by SIGTERM"),
    (signal.SIGHUP, False, "terminated by SIGHUP"),
])
def test_stop_signal_stops_every_rank(jobs, tmp_path, signum, to_group, line):
    job = jobs(ENDLESS, tmp_path / "cache")
    startup_s, ranks = job.wait_until_inside()
    assert sorted(ranks) == [0, 1]
    status, err = job.stopped_by(lambda: (os.killpg if to_group else os.kill)(job.pid, signum), startup_s)
    assert status == 128 + signum, err
    assert err.strip() == line, err


def test_torchrun_ranks_leave_on_its_sigterm(jobs, tmp_path):
    """torchrun forwards SIGTERM to its ranks; they leave at once, even from inside a collective."""
    job = jobs(["--nproc-per-node", "2", "--master-port", str(launch.free_port()), "-m", "iso_kernels", *ENDLESS,
                "--tp", "2"], tmp_path / "cache", module="torch.distributed.run")
    startup_s, _ = job.wait_until_inside()
    status, err = job.stopped_by(lambda: os.kill(job.pid, signal.SIGTERM), startup_s)
    assert status != 0
    assert "leaked semaphore" not in err and "terminate called" not in err, err


# --- 2. a rank killed by a signal is the cause ---
@pytest.mark.parametrize("rank, signum", [(1, signal.SIGKILL), (0, signal.SIGSEGV)])
def test_killed_rank_is_named(jobs, tmp_path, rank, signum):
    job = jobs(ENDLESS, tmp_path / "cache")
    startup_s, ranks = job.wait_until_inside()
    status, err = job.stopped_by(lambda: os.kill(ranks[rank], signum), startup_s)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert lines[-1] == f"error: rank {rank} died: killed by {signum.name}", err
    if signum == signal.SIGSEGV:  # the elastic launcher's faulthandler shows where the rank was
        assert lines[0] == "Fatal Python error: Segmentation fault", err
    else:
        assert len(lines) == 1, err
    _assert_clean(err)


def _peer_stops_answering(rank, world_size, folder):
    import torch.distributed as dist

    (Path(folder) / f"rank{rank}.pid").write_text(str(os.getpid()))
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # alive but gone: its sockets stay open, nothing errors
    dist.barrier()  # rank 0 blocks here inside gloo


def _nothing(rank, world_size):
    return rank


def test_rank_blocked_on_a_silent_peer_leaves_at_the_timeout(tmp_path):
    start = time.monotonic()
    launch.spawn_ranks(_nothing, 2)
    timeout_s = 4 * (time.monotonic() - start)  # room to start: a few times a whole launch here, now
    start = time.monotonic()
    with pytest.raises(launch.RankError) as info:
        launch.spawn_ranks(_peer_stops_answering, 2, args=(str(tmp_path),), timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert "timed out" in str(info.value).lower(), info.value
    for rank in range(2):
        assert _stat(int((tmp_path / f"rank{rank}.pid").read_text())) is None, f"rank {rank} still exists"
    assert elapsed < 2 * timeout_s  # without the deadline it would wait forever


# --- 3. a shared, corrupt or unwritable cache ---
def test_two_runs_share_a_fresh_cache(jobs, tmp_path):
    cache = tmp_path / "cache"
    runs = [jobs(QUICK + ["--seq-len", str(n), "--tp", "2"], cache) for n in (40, 48)]
    for run in runs:
        status, _, err = run.finish()
        assert status == 0, err
        assert "warning" not in err, err
    entries = json.loads((cache / "calibration.json").read_text())["entries"]
    assert sorted(e["key"]["seq_len"] for e in entries) == [40, 48]  # neither save lost the other's entry
    checkpoint.load_checkpoint(cache / "models" / "llama-tiny")
    leftovers = [p.name for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


_SAVE_MANY = """
import sys
from iso_kernels import planning
costs = planning.LayerCosts(1e-4, 1e-6, 1e-9, 1e-4, 1e-6, 1e-5, 1e9)
for i in range(40):
    planning.save_calibration(sys.argv[1], costs, {"writer": sys.argv[2], "i": i})
"""


def test_concurrent_saves_keep_every_entry(tmp_path):
    path = tmp_path / "calibration.json"
    writers = [subprocess.Popen([sys.executable, "-c", _SAVE_MANY, str(path), name]) for name in "ab"]
    for writer in writers:
        assert writer.wait(timeout=PATIENCE_S) == 0
    entries = json.loads(path.read_text())["entries"]
    assert sorted((e["key"]["writer"], e["key"]["i"]) for e in entries) == [(w, i) for w in "ab" for i in range(40)]


def test_truncated_calibration_file_warns_once_and_recalibrates(jobs, tmp_path):
    cache = tmp_path / "cache"
    assert jobs(QUICK + ["--tp", "1"], cache).finish()[0] == 0
    path = cache / "calibration.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:len(path.read_text()) // 2])  # as if a disk filled up mid-write
    status, _, err = jobs(QUICK + ["--tp", "1"], cache).finish()
    assert status == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: ignoring unreadable calibration cache {path}"), err
    assert json.loads(path.read_text()).keys() == good.keys()  # written again, whole
    assert [e["key"] for e in json.loads(path.read_text())["entries"]] == [e["key"] for e in good["entries"]]


def test_unwritable_cache_gives_one_error_line(jobs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, _, err = jobs(QUICK, blocker / "cache").finish()
    assert status == 2
    assert err.strip() == (f"error: cannot make the llama-tiny checkpoint in {blocker}/cache/models: "
                           "Not a directory (set ISO_KERNELS_CACHE_DIR to a writable folder)"), err


def test_unwritable_cache_with_a_checkpoint_folder_runs_uncached(jobs, tmp_path):
    folder = checkpoint.save_random_checkpoint(checkpoint.preset_config("llama-tiny"), tmp_path / "tiny")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, _, err = jobs(QUICK + ["--model", str(folder), "--tp", "1"], blocker / "cache").finish()
    assert status == 0, err
    assert err.strip() == f"warning: calibration not cached: cannot write {blocker}/cache/calibration.json " \
                          "(Not a directory)", err


def test_bad_cache_layouts_load_as_empty(tmp_path):
    path = tmp_path / "calibration.json"
    for text in ("\x00\x17 not json", '{"entries": 3}', '{"entries": [{"key": {}}]}',
                 '{"entries": [{"key": {}, "costs": {"speed": 1}}]}', "[]", '{"version": 1}'):
        path.write_text(text)
        with pytest.warns(UserWarning, match="unreadable"):
            assert planning.load_calibration(path, {}) is None


# --- 4. a missing extra ---
_WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if 'pip install .' left it out
from iso_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_extra_fails_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", _WITHOUT_MATPLOTLIB, *QUICK, "--plot", str(tmp_path / "g.png")],
                          check=False, capture_output=True, text=True, timeout=PATIENCE_S,
                          env={**os.environ, "ISO_KERNELS_CACHE_DIR": str(cache)})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --plot needs matplotlib: pip install 'iso-kernels[plot]'", done.stderr
    assert not cache.exists(), "work started (the preset checkpoint was made) before the check"


# --- 7. a torchrun rank's exit ---
# A rank leaves through a plain interpreter exit, without destroying its group, right after an all-reduce of
# comm.TorchCommunicator: rank 0 while its all-reduce is in flight ("pending") or just after waiting for it
# ("completed"); rank 1 issues its side a moment later and waits for it.
_EXIT_AROUND_AN_ALL_REDUCE = """
import sys, time, torch, torch.distributed as dist
from iso_kernels import comm
dist.init_process_group("gloo")
communicator = comm.TorchCommunicator()
x = torch.ones(1024)
dist.barrier()
if dist.get_rank() == 1:
    time.sleep(0.5)
pending = communicator.all_reduce_start(x)
if dist.get_rank() == 1 or sys.argv[1] == "completed":
    assert pending.wait()[0] == 2 and pending.interval is not None
"""
EXIT_RUNS = 5  # per case


@pytest.mark.parametrize("case", ["pending", "completed"])
def test_torchrun_rank_exits_cleanly_around_an_all_reduce(jobs, tmp_path, case):
    """No Python runs on gloo's threads, so none of them needs the GIL while a rank's interpreter finalizes
    (CPython before 3.14 pthread_exits such a thread, and the unwind through libtorch's noexcept frames calls
    std::terminate: "terminate called without an active exception", SIGABRT). A done-callback on the work's
    future, as comm.TorchCommunicator had, aborted 8 of 8 "pending" runs and 2 of 8 "completed" ones."""
    script = tmp_path / "exit_around_all_reduce.py"
    script.write_text(_EXIT_AROUND_AN_ALL_REDUCE)
    for _ in range(EXIT_RUNS):
        job = jobs(["--nproc-per-node", "2", "--master-port", str(launch.free_port()), str(script), case],
                   tmp_path / "cache", module="torch.distributed.run")
        status, _, err = job.finish()
        assert status == 0 and "terminate called" not in err, err[-3000:]
        job.assert_nothing_left(within_s=PATIENCE_S)


# What a rank of 'torchrun -m iso_kernels' does around its group: imports the CLI, joins the group, imports
# torch._dynamo (creating a model may), destroys the group; no gloo thread may outlive that into finalization.
_DESTROY_AFTER_A_LATE_DYNAMO_IMPORT = """
import os, torch, torch.distributed as dist
import iso_kernels.cli
dist.init_process_group("gloo")
import torch._dynamo
dist.all_reduce(torch.ones(4))
dist.destroy_process_group()
threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
assert not [name for name in threads if name.startswith("pt_gloo")], threads
"""


def test_destroyed_group_leaves_no_gloo_thread_behind(jobs, tmp_path):
    script = tmp_path / "destroy.py"
    script.write_text(_DESTROY_AFTER_A_LATE_DYNAMO_IMPORT)
    job = jobs(["--nproc-per-node", "2", "--master-port", str(launch.free_port()), str(script)],
               tmp_path / "cache", module="torch.distributed.run")
    status, _, err = job.finish()
    assert status == 0, err[-3000:]


def test_launcher_killed_outright_takes_its_ranks(jobs, tmp_path):
    """kill -9 of the launcher gives it no chance to stop anything; the ranks go with it all the same
    (torch.multiprocessing's parent-death signal, SIGINT, whose default action the ranks keep)."""
    job = jobs(ENDLESS, tmp_path / "cache")
    startup_s, ranks = job.wait_until_inside()
    status, _ = job.stopped_by(lambda: os.kill(job.pid, signal.SIGKILL), startup_s)
    assert status == -signal.SIGKILL
    assert all(_stat(pid) is None or _stat(pid)[0] in "ZX" for pid in ranks.values())
