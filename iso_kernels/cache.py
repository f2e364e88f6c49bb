"""The cache folder (``ISO_KERNELS_CACHE_DIR``, default ``~/.cache/iso_kernels``): preset checkpoints and the
cost model's calibration file.

Several processes may fill it at once (two CLI runs, torchrun's ranks). A writer holds an exclusive
``flock`` on a lock file beside what it writes, so a second writer waits and then finds the work done (or, for
the calibration file, adds its entry to the first one's instead of overwriting it); and it writes aside and
renames, so a reader never sees half a file.
"""

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on ``<path>.lock`` (made with its folder if missing) while the block runs."""
    lock_path = Path(f"{path}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def write_text_atomically(path, text):
    """``path`` gets ``text`` whole or not at all (written aside in the same folder, then renamed)."""
    path = Path(path)
    fd, scratch = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(scratch, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
