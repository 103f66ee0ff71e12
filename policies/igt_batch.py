"""Array forms of IGT's per-read steps, for batches of reads (``IGT.observe_many``).

A batch's reads are sorted by reader (stably, so each reader's reads stay in
order) and each step runs over the whole batch at once, segment by segment:
``starts`` are the first positions of the segments.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .igt_readahead import Reader


def last_true(mask: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Per position, the latest position at or before it where ``mask`` holds, not
    before ``floor`` (its segment's start); -1 where there is none."""
    last = np.maximum.accumulate(np.where(mask, np.arange(len(mask)), -1))
    return np.where(last >= floor, last, -1)


def advance_readers(readers: Sequence[Reader | None], starts: np.ndarray, offset: np.ndarray,
                    size: np.ndarray, ts: np.ndarray, end: np.ndarray, first: np.ndarray,
                    last: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:meth:`Reader.advance` and the end and block bookkeeping of ``IGT.observe`` for
    reads sorted by reader (reader ``g``'s from ``starts[g]``), all at once.

    A ``None`` reader is a fresh one that is not kept. Each kept reader is left
    as after its last read. Returns per read: ``run``, whether it was
    contiguous, the reader's rate after it (nan: none yet), and whether its
    first block continues the block the reader was in (the same visit).
    """
    lengths = np.diff(np.append(starts, len(offset)))
    floor = np.repeat(starts, lengths)

    def before(attr: str, fresh: float) -> np.ndarray:
        values = [fresh if r is None or getattr(r, attr) is None else getattr(r, attr) for r in readers]
        return np.repeat(np.array(values), lengths)

    pos = np.arange(len(offset))
    prev_end = np.where(pos == floor, before("end", -1), np.roll(end, 1))
    gap = offset - prev_end
    contiguous = (prev_end >= 0) & (gap >= 0) & (gap < size)
    reset = last_true(~contiguous, floor)
    restarted = reset >= 0
    run = np.where(restarted, pos - reset + 1, before("run", 0) + pos - floor + 1)
    run_offset = np.where(restarted, offset[reset], before("run_offset", 0))
    run_ts = np.where(restarted, ts[reset], before("run_ts", 0.0))
    elapsed = ts - run_ts
    updated = last_true(contiguous & (elapsed > 0), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        speed = (offset - run_offset) / elapsed
    rate = np.where(updated >= 0, speed[updated], before("rate", np.nan))
    touched = last >= first
    in_block = last_true(touched, floor)
    previous = np.where(pos > floor, np.roll(in_block, 1), -1)
    continues = (run >= 2) & touched & (first == np.where(previous >= 0, last[previous], before("last_block", -1)))

    tails = np.append(starts[1:], len(offset)) - 1
    last_block = np.where(in_block >= 0, last[in_block], -1)[tails]
    for reader, *after in zip(readers, end[tails].tolist(), run[tails].tolist(), run_offset[tails].tolist(),
                              run_ts[tails].tolist(), rate[tails].tolist(), restarted[tails].tolist(),
                              last_block.tolist()):
        if reader is None:
            continue
        reader.end, reader.run, reader.run_offset, reader.run_ts, pace, jumped, block = after
        reader.rate = None if math.isnan(pace) else pace
        if jumped:
            reader.upto = -1
        if block >= 0:
            reader.last_block = block
    return run, contiguous, rate, continues
