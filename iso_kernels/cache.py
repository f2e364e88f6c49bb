"""The cache folder (``ISO_KERNELS_CACHE_DIR``, default ``~/.cache/iso_kernels``): preset checkpoints, the
cost model's calibration file and the split trials' choices (``KeyedJsonFile``).

Several processes may fill it at once (two CLI runs, torchrun's ranks). A writer holds an exclusive
``flock`` on a lock file beside what it writes, so a second writer waits and then finds the work done (or, for
the calibration file, adds its entry to the first one's instead of overwriting it); and it writes aside and
renames, so a reader never sees half a file.
"""

import contextlib
import fcntl
import json
import os
import tempfile
import warnings
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


class KeyedJsonFile:
    """A JSON file of measurements, each stored under the key (a JSON-able dict) of what it depends on.

    ``what`` names the measurement in warnings and ``redo`` says what happens instead of using it; ``parse``
    turns a stored value into the caller's type. An unreadable, truncated or malformed file counts as empty,
    with one warning when loading, so the caller measures again and its save replaces the file. A file that
    cannot be written leaves the measurement uncached, with one warning.
    """

    def __init__(self, path, what, redo, parse=lambda value: value):
        self.path, self.what, self.redo, self.parse = Path(path), what, redo, parse

    @staticmethod
    def normalized(key):
        if not isinstance(key, dict):
            raise TypeError(f"key must be a dict of machine/model descriptors, got {type(key).__name__}")
        try:
            return json.loads(json.dumps(key, sort_keys=True))
        except TypeError as exc:
            raise TypeError(f"key must be JSON-serialisable: {exc}") from None

    def _entries(self, *, warn):
        try:
            entries = json.loads(self.path.read_text())["entries"]
            return [(entry["key"], entry["value"], self.parse(entry["value"])) for entry in entries]
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (or no folder: saving will say)
            return []
        except OSError as exc:
            problem = exc.strerror
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, cut short, or not our layout
            problem = f"{type(exc).__name__}: {exc}"
        if warn:
            warnings.warn(f"ignoring unreadable {self.what} cache {self.path} ({problem}); {self.redo}",
                          stacklevel=4)
        return []

    def load(self, key):
        """The value stored under exactly ``key``, parsed, else None."""
        key = self.normalized(key)
        return next((parsed for k, _, parsed in self._entries(warn=True) if k == key), None)

    def save(self, key, value):
        """Store the JSON-able ``value`` under ``key``, replacing an entry with the same key. Returns the path,
        or None (with a warning) when the file cannot be written."""
        key = self.normalized(key)
        try:
            with locked(self.path):  # read, add, write as one step, so writers at once keep each other's entries
                entries = [{"key": k, "value": v} for k, v, _ in self._entries(warn=False) if k != key]
                entries.append({"key": key, "value": value})
                write_text_atomically(self.path, json.dumps({"version": 2, "entries": entries}, indent=1))
        except OSError as exc:
            warnings.warn(f"{self.what} not cached: cannot write {self.path} ({exc.strerror or exc})",
                          stacklevel=3)
            return None
        return self.path
