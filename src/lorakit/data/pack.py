"""Best-Fit-Decreasing packing: several examples share one row of at most `capacity` tokens.

Rows only group examples; how a packed row becomes tensors (position ids restarting at 0 for each
example, so that no token attends across examples, and a masked boundary label) is in
`lorakit.train.batches.collate`. The packing is a pure function of the lengths, so the rows, and the
order the schedule draws them in, are the same on every run and on resume.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Example indices of each row, longest examples first, each put into the open row it fills best
    (the one with the least room left that still fits it). Rows come out in the order they opened."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example is longer than the row capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free = _RoomIndex(capacity)  # rows by the room they have left
    for i in order:
        n = lengths[i]
        room = free.smallest_at_least(n)
        if room is None:
            rows.append([i])
            row, left = len(rows) - 1, capacity - n
        else:
            row = free.take(room)
            rows[row].append(i)
            left = room - n
        if left > 0:
            free.put(left, row)
    return rows


def efficiency(lengths: Sequence[int], rows: list[list[int]], capacity: int) -> float:
    """Real tokens / (rows x capacity): the share of the packed rows that is not padding."""
    return sum(lengths) / (len(rows) * capacity) if rows else 0.0


class _RoomIndex:
    """Open rows keyed by the room they have left, with a segment tree over room sizes 0..capacity
    answering "the smallest room >= n" in O(log capacity); among equal rooms the newest row wins."""

    def __init__(self, capacity: int):
        self.size = 1 << max(1, capacity).bit_length()
        self.count = [0] * (2 * self.size)  # rows with each room (leaves), sums above
        self.rows: dict[int, list[int]] = {}

    def put(self, room: int, row: int) -> None:
        self.rows.setdefault(room, []).append(row)
        self._add(room, 1)

    def take(self, room: int) -> int:
        self._add(room, -1)
        return self.rows[room].pop()

    def smallest_at_least(self, n: int) -> int | None:
        return self._first_nonempty(1, 0, self.size, n)

    def _add(self, room: int, delta: int) -> None:
        k = room + self.size
        while k:
            self.count[k] += delta
            k //= 2

    def _first_nonempty(self, node: int, lo: int, hi: int, n: int) -> int | None:
        """The smallest leaf >= n with a row, under `node` which covers [lo, hi)."""
        if hi <= n or not self.count[node]:
            return None
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        left = self._first_nonempty(2 * node, lo, mid, n)
        return left if left is not None else self._first_nonempty(2 * node + 1, mid, hi, n)
