"""Tier 1: the change log never answers fewer chunks than changed (replica/changes.py)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from blockhorn.replica import changes
from blockhorn.replica.changes import CHUNK, ChangeLog

ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 64 * CHUNK), st.integers(0, 3 * CHUNK)),
    st.tuples(st.just("flush"), st.just(0), st.just(0))), max_size=300)


@settings(max_examples=300, deadline=None)
@given(ops=ops, start=st.integers(0, 5), query=st.integers(0, 400), tiny=st.booleans())
def test_since_covers_every_change_after_the_revision(ops, start, query, tiny) -> None:
    if tiny:      # force merges and segment cuts
        changes.MAX_SEGMENTS, changes.SEGMENT_MUTATIONS, changes.MAX_TRACKED = 3, 2, 64
    try:
        log = ChangeLog(start)
        rev = start
        truth: list[tuple[int, int, int]] = []
        for kind, off, length in ops:
            if kind == "flush":
                log.cut()
                continue
            rev += 1
            log.record(rev, off, length)
            truth.append((rev, off, length))
        got = log.since(query)
        if query < log.start:
            assert got is None
            return
        assert got is not None
        covered = set()
        for s, n in got:
            assert s % CHUNK == 0 and n % CHUNK == 0
            covered.update(range(s // CHUNK, (s + n) // CHUNK))
        for r, off, length in truth:
            if r > query and length:
                need = set(range(off // CHUNK, (off + length - 1) // CHUNK + 1))
                assert need <= covered, (r, off, length)
    finally:
        changes.MAX_SEGMENTS, changes.SEGMENT_MUTATIONS = 256, 4096
        changes.MAX_TRACKED = 1 << 20


def test_a_flush_makes_the_boundary_exact() -> None:
    log = ChangeLog(0)
    log.record(1, 0, CHUNK)
    log.cut()
    log.record(2, 10 * CHUNK, CHUNK)
    assert log.since(1) == [(10 * CHUNK, CHUNK)]
    assert log.since(0) == [(0, CHUNK), (10 * CHUNK, CHUNK)]
