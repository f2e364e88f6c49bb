"""How a prompt is cut into chunks: ``ChunkSplit``, the one type and the one validator every layer uses
(the schedule, the cost model, the prefill job)."""

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkSplit:
    """Chunk ends of a prompt, relative to its first position: strictly increasing, the last = its length.
    ``ChunkSplit((5, 16, 37))`` is three chunks, [0, 5), [5, 16) and [16, 37); ``ChunkSplit((37,))`` one."""

    ends: tuple

    def __post_init__(self):
        ends = tuple(self.ends)
        if not ends:
            raise ValueError("a split needs at least one chunk end")
        for end in ends:
            if isinstance(end, bool) or not isinstance(end, (int, np.integer)):
                raise TypeError(f"chunk ends must be ints, got {end!r} in {list(ends)}")
        if any(b <= a for a, b in itertools.pairwise((0,) + ends)):
            raise ValueError(f"split: chunk ends must be strictly increasing and > 0, got {list(ends)}")
        object.__setattr__(self, "ends", tuple(int(end) for end in ends))

    @classmethod
    def even(cls, seq_len, chunks=2):
        """``chunks`` chunks of (nearly) equal length, the longer ones first."""
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        if seq_len < chunks:
            raise ValueError(f"a prompt of {seq_len} tokens cannot be cut into {chunks} chunks")
        return cls(tuple(math.ceil(seq_len * (i + 1) / chunks) for i in range(chunks)))

    @classmethod
    def at(cls, seq_len, where):
        """Two chunks, the second beginning at token index ``where`` (an int) or after the fraction ``where``
        (a float in (0, 1)) of the prompt."""
        if isinstance(where, float):
            if not 0.0 < where < 1.0:
                raise ValueError(f"split fraction must be in (0, 1), got {where}")
            where = round(where * seq_len)
        if not 0 < where < seq_len:
            raise ValueError(f"split {where} is outside the prompt (1 .. {seq_len - 1})")
        return cls((where, seq_len))

    @classmethod
    def from_fractions(cls, seq_len, fractions):
        """The split of a ``seq_len``-token prompt whose chunk ends sit at ``fractions`` of it (the last 1.0);
        ends that round onto each other merge."""
        ends = sorted({max(1, min(seq_len, round(f * seq_len))) for f in fractions} | {seq_len})
        return cls(tuple(ends))

    @property
    def seq_len(self):
        return self.ends[-1]

    def __len__(self):
        return len(self.ends)

    def bounds(self, start=0):
        """Absolute (start, end) positions of each chunk when the prompt begins at position ``start``."""
        return [(start + a, start + b) for a, b in zip((0,) + self.ends[:-1], self.ends, strict=True)]
