"""The layer map: which layer holds each range of a replica's chain.

Longhorn keeps one byte per 4 KiB sector (256 MiB of RAM per TiB). blockhorn keeps sorted,
non-overlapping extents `[start, end) -> layer index`, so memory grows with the number of
distinct extents, not with the volume size. Built from SEEK_DATA/SEEK_HOLE when a replica opens
(oldest layer first, each newer layer overlaid) and kept up to date on every head write.
Layer index 0 is the oldest layer; ranges that no layer holds read as zeros.
"""

from __future__ import annotations

import bisect
import heapq
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator

ZERO = -1  # lookup result for a range no layer holds


class ExtentMap:
    def __init__(self) -> None:
        # Three packed arrays (8 + 8 + 4 bytes per extent), not lists of int objects.
        self._starts = array("q")
        self._ends = array("q")
        self._layers = array("i")

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
        starts[i:j] = array("q", [p[0] for p in pieces])
        ends[i:j] = array("q", [p[1] for p in pieces])
        layers[i:j] = array("i", [p[2] for p in pieces])

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

    def memory(self) -> int:
        """Bytes held by the map's arrays."""
        return sum(a.buffer_info()[1] * a.itemsize for a in (self._starts, self._ends,
                                                              self._layers))

    def extents(self) -> Iterator[tuple[int, int, int]]:
        yield from zip(self._starts, self._ends, self._layers, strict=True)

    def append(self, start: int, end: int, layer: int) -> None:
        """Add an extent after every existing one (bulk building); merges a touching twin."""
        if self._starts and self._ends[-1] == start and self._layers[-1] == layer:
            self._ends[-1] = end
        else:
            self._starts.append(start)
            self._ends.append(end)
            self._layers.append(layer)

    @classmethod
    def sweep(cls, extents: Iterable[tuple[int, int, int]]) -> ExtentMap:
        """Build a map from extents of many layers at once (the newest layer wins), in
        O(n log n): a sweep over the boundaries with a heap of the layers active there.
        Extents of one layer must not overlap each other (SEEK_DATA ranges never do)."""
        events: list[tuple[int, int, int]] = []
        for s, e, layer in extents:
            if s < e:
                events.append((s, 1, layer))
                events.append((e, 0, layer))
        events.sort()                     # at one position, ends before starts
        out = cls()
        active: list[int] = []            # max-heap of layers, as negatives
        ended: Counter[int] = Counter()   # lazy deletions
        i, n = 0, len(events)
        while i < n:
            pos = events[i][0]
            while i < n and events[i][0] == pos:
                _, starts, layer = events[i]
                if starts:
                    heapq.heappush(active, -layer)
                else:
                    ended[layer] += 1
                i += 1
            while active and ended[-active[0]]:
                ended[-active[0]] -= 1
                heapq.heappop(active)
            if active and i < n:
                out.append(pos, events[i][0], -active[0])
        return out


class LayerMap:
    """The map of a whole chain: `base` for the snapshot layers (immutable between snapshots,
    built in bulk) and `head` for the writable top layer (updated on every write). A head write
    then costs in proportion to the head's extents, not to the whole chain's."""

    def __init__(self, base: ExtentMap, head: ExtentMap, head_index: int) -> None:
        self.base = base
        self.head = head
        self.head_index = head_index

    @classmethod
    def build(cls, layer_extents: list[list[tuple[int, int]]]) -> LayerMap:
        """From each layer's data extents, oldest layer first; the last one is the head."""
        base = ExtentMap.sweep((s, e, i) for i, ext in enumerate(layer_extents[:-1])
                               for s, e in ext)
        head = ExtentMap()
        top = len(layer_extents) - 1
        for s, e in layer_extents[-1] if layer_extents else []:
            head.append(s, e, top)
        return cls(base, head, top)

    def push_head(self) -> None:
        """A snapshot froze the head: it joins the base, a new empty head goes on top."""
        self.base = ExtentMap.sweep([*self.base.extents(), *self.head.extents()])
        self.head = ExtentMap()
        self.head_index += 1

    def overlay_head(self, start: int, end: int) -> None:
        self.head.overlay(start, end, self.head_index)

    def lookup(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        for s, e, layer in self.head.lookup(start, end):
            if layer == ZERO:
                yield from self.base.lookup(s, e)
            else:
                yield s, e, layer

    def memory(self) -> int:
        return self.base.memory() + self.head.memory()

    def __len__(self) -> int:
        return len(self.base) + len(self.head)
