"""The change log: which 4 KiB blocks of the volume changed after which revision.

A replica records every mutation it executes (the revision it got, offset, length) since its
process opened it, or since its content was last replaced by a resync. A replica that returns
after a blip asks for `since(R)` (R: its own revision) and gets every chunk changed by a
mutation numbered R+1 or later — what it may have missed — so its resync copies only those
(Mayastor keeps such a log at 64 KiB; at 4 KiB a resync after random 4 KiB writes copies about
what was written, not 16 times that). docs/DURABILITY.md, "Incremental resync", says when the
engine may rely on it.

Memory stays bounded: mutations are grouped into segments (a new one every SEGMENT_S seconds
or SEGMENT_MUTATIONS mutations, and at every FLUSH — a replica that crashed returns with the
revision of its last FLUSH, so that boundary is exact); past MAX_SEGMENTS, the two oldest are
merged. A merge loses
only precision about *when* a block changed, so `since` may answer more blocks than needed,
never fewer. Past MAX_TRACKED blocks in all, the oldest segments are dropped and `start`
moves past them: the log then no longer reaches that far back (a resync from there is a full
one) rather than using unbounded memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

CHUNK = 4096                   # bytes per tracked block
MAX_TRACKED = 1 << 20          # blocks remembered in all (~70 MB of Python ints at worst)
SEGMENT_S = 1.0                # seconds a segment stays open
SEGMENT_MUTATIONS = 4096       # mutations per segment at most
MAX_SEGMENTS = 256             # older segments are merged beyond this many


@dataclass
class Segment:
    first: int                 # lowest revision recorded in it
    last: int                  # highest revision recorded in it
    opened: float
    chunks: set[int] = field(default_factory=set)


class ChangeLog:
    def __init__(self, start: int) -> None:
        self.reset(start)

    def reset(self, start: int) -> None:
        """The content now equals revision `start` of the volume (open, end of a resync):
        `since(R)` can answer only for R >= start."""
        self.start = start
        self.segments: list[Segment] = []
        self.tracked = 0
        self._cut = False

    def cut(self) -> None:
        """Start a new segment with the next mutation (at a FLUSH)."""
        self._cut = True

    def record(self, revision: int, offset: int, length: int) -> None:
        """Mutation number `revision` changed [offset, offset + length)."""
        now = time.monotonic()
        seg = self.segments[-1] if self.segments else None
        if seg is None or self._cut or now - seg.opened > SEGMENT_S \
                or seg.last - seg.first >= SEGMENT_MUTATIONS:
            self._cut = False
            seg = Segment(revision, revision, now)
            self.segments.append(seg)
            if len(self.segments) > MAX_SEGMENTS:
                a, b = self.segments[0], self.segments[1]
                merged = Segment(a.first, b.last, a.opened, a.chunks | b.chunks)
                self.tracked -= len(a.chunks) + len(b.chunks) - len(merged.chunks)
                self.segments[:2] = [merged]
        seg.last = revision
        if length > 0:
            before = len(seg.chunks)
            seg.chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
            self.tracked += len(seg.chunks) - before
            while self.tracked > MAX_TRACKED and len(self.segments) > 1:
                old = self.segments.pop(0)
                self.tracked -= len(old.chunks)
                self.start = max(self.start, old.last)

    def since(self, revision: int) -> list[tuple[int, int]] | None:
        """Ranges (start, length) changed by mutations after `revision`, merged and sorted;
        None when the log does not reach back that far."""
        if revision < self.start:
            return None
        chunks: set[int] = set()
        for seg in self.segments:
            if seg.last > revision:
                chunks |= seg.chunks
        out: list[tuple[int, int]] = []
        for c in sorted(chunks):
            if out and out[-1][0] + out[-1][1] == c * CHUNK:
                out[-1] = (out[-1][0], out[-1][1] + CHUNK)
            else:
                out.append((c * CHUNK, CHUNK))
        return out
