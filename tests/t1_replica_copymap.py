"""Tier 1: the copy session's block map (blockhorn/replica/copymap.py) against a plain list."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockhorn.replica.copymap import REGION_BLOCKS, CopyMap

N = 4 * REGION_BLOCKS + 37          # blocks: regions, and a partial last one

span = st.tuples(st.integers(0, N), st.integers(0, N)).map(sorted)


@settings(max_examples=300, deadline=None)
@given(marks=st.lists(span, max_size=12), query=span)
def test_clean_runs_are_the_unmarked_blocks(marks, query) -> None:
    m = CopyMap()
    ref = [False] * N
    for a, b in marks:
        m.mark(a, b)
        ref[a:b] = [True] * (b - a)
    first, end = query
    runs = m.clean_runs(first, end)
    got = [False] * N
    for a, b in runs:
        assert first <= a < b <= end
        got[a:b] = [True] * (b - a)
    assert got[first:end] == [not x for x in ref[first:end]]
    assert all(runs[i][1] < runs[i + 1][0] for i in range(len(runs) - 1))   # merged
    assert len(m.regions) <= -(-N // REGION_BLOCKS)
