"""The layer map: which layer holds each range of a replica's chain.

Longhorn keeps one byte per 4 KiB sector (256 MiB of RAM per TiB). blockhorn keeps sorted,
non-overlapping extents `[start, end) -> layer index`, so memory grows with the number of
distinct extents, not with the volume size. Built from SEEK_DATA/SEEK_HOLE when a replica opens
(oldest layer first, each newer layer overlaid) and kept up to date on every head write.
Layer index 0 is the oldest layer; ranges that no layer holds read as zeros.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

ZERO = -1  # lookup result for a range no layer holds


class ExtentMap:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._layers: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def overlay(self, start: int, end: int, layer: int) -> None:
        """Record that `layer` holds [start, end), hiding whatever was there."""
        if start >= end:
            return
        starts, ends, layers = self._starts, self._ends, self._layers
        # First extent that may overlap or touch: the one before the insertion point.
        i = bisect.bisect_right(starts, start)
        while i > 0 and ends[i - 1] >= start:
            i -= 1
        j = i
        new_start, new_end = start, end
        keep_left: tuple[int, int, int] | None = None
        keep_right: tuple[int, int, int] | None = None
        while j < len(starts) and starts[j] <= end:
            s, e, lay = starts[j], ends[j], layers[j]
            if lay == layer:
                new_start = min(new_start, s)     # merge with a touching/overlapping twin
                new_end = max(new_end, e)
            else:
                if s < start:
                    keep_left = (s, min(e, start), lay)
                if e > end:
                    keep_right = (max(s, end), e, lay)
            j += 1
        pieces = []
        if keep_left and keep_left[0] < keep_left[1]:
            pieces.append(keep_left)
        pieces.append((new_start, new_end, layer))
        if keep_right and keep_right[0] < keep_right[1]:
            pieces.append(keep_right)
        starts[i:j] = [p[0] for p in pieces]
        ends[i:j] = [p[1] for p in pieces]
        layers[i:j] = [p[2] for p in pieces]

    def lookup(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Yield (s, e, layer) covering [start, end) in order; layer ZERO where no layer holds data."""
        starts, ends, layers = self._starts, self._ends, self._layers
        i = bisect.bisect_right(starts, start)
        if i > 0 and ends[i - 1] > start:
            i -= 1
        pos = start
        while pos < end:
            if i >= len(starts) or starts[i] >= end:
                yield pos, end, ZERO
                return
            s, e = starts[i], ends[i]
            if s > pos:
                yield pos, s, ZERO
                pos = s
            stop = min(e, end)
            yield pos, stop, layers[i]
            pos = stop
            i += 1

    def extents(self) -> Iterator[tuple[int, int, int]]:
        yield from zip(self._starts, self._ends, self._layers, strict=True)
