"""Best-Fit-Decreasing packing: several examples share one row of at most `capacity` tokens.

Rows only group examples; how a packed row becomes tensors (position ids restarting at 0 for each
example, so that no token attends across examples, and a masked boundary label) is in
`lorakit.train.batches.collate`. The packing is a pure function of the lengths, so the rows, and the
order the schedule draws them in, are the same on every run and on resume.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices of each row, longest examples first, each put into the open row it fills best
    (the one with the least room left that still fits it; among equal rooms the newest row). Rows come
    out in the order they opened."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the row capacity {capacity}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable: ties by index
    rows: list[list[int]] = []
    rooms: list[int] = []  # the distinct room sizes open rows have left, ascending (at most capacity)
    open_rows: dict[int, list[int]] = {}  # rows by the room they have left, newest last
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(rooms, n)
        if at == len(rooms):
            rows.append([i])
            row, left = len(rows) - 1, capacity - n
        else:
            room = rooms[at]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del rooms[at], open_rows[room]
            rows[row].append(i)
            left = room - n
        if left > 0:
            if left not in open_rows:
                bisect.insort(rooms, left)
            open_rows.setdefault(left, []).append(row)
    return rows


def efficiency(lengths: Sequence[int], rows: list[list[int]], capacity: int) -> float:
    """Real tokens / (rows x capacity): the share of the packed rows that is not padding."""
    return sum(lengths) / (len(rows) * capacity) if rows else 0.0
