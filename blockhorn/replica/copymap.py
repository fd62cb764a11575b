"""The blocks a mutation reached during a rebuild's copy session (docs/DURABILITY.md, "Rebuild").

One byte per 4 KiB block, allocated per 1 MiB region a mutation touches: the memory follows
what was written during the copy (256 bytes per touched MiB), not the volume's size.
"""

from __future__ import annotations

REGION_BLOCKS = 256          # 4 KiB blocks per lazily allocated region (1 MiB)


class CopyMap:
    def __init__(self) -> None:
        self.regions: dict[int, bytearray] = {}

    def mark(self, first: int, end: int) -> None:
        """Blocks [first, end) were reached by a mutation."""
        block = first
        while block < end:
            region, i = divmod(block, REGION_BLOCKS)
            j = min(REGION_BLOCKS, i + end - block)
            marks = self.regions.get(region)
            if marks is None:
                marks = self.regions[region] = bytearray(REGION_BLOCKS)
            marks[i:j] = b"\1" * (j - i)
            block += j - i

    def clean_runs(self, first: int, end: int) -> list[tuple[int, int]]:
        """[start, end) block ranges of [first, end) that no mutation reached, merged."""
        runs: list[tuple[int, int]] = []

        def add(a: int, b: int) -> None:
            if runs and runs[-1][1] == a:
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))

        block = first
        while block < end:
            region, i = divmod(block, REGION_BLOCKS)
            j = min(REGION_BLOCKS, i + end - block)
            base = region * REGION_BLOCKS
            marks = self.regions.get(region)
            if marks is None:
                add(base + i, base + j)
            else:
                k = i
                while k < j:
                    d = marks.find(1, k, j)
                    d = j if d < 0 else d
                    if d > k:
                        add(base + k, base + d)
                    c = marks.find(0, d, j)
                    k = j if c < 0 else c
            block = base + j
        return runs
