"""Tier 0: the extent-based layer map against a byte-per-block model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from blockhorn.replica.extentmap import ZERO, ExtentMap, LayerMap

SPAN = 64

ops = st.lists(st.tuples(st.integers(0, SPAN - 1), st.integers(1, 16), st.integers(0, 3)),
               max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, SPAN - 1), st.integers(1, SPAN))
def test_overlay_matches_model(writes, qstart, qlen) -> None:
    m = ExtentMap()
    model = [ZERO] * SPAN
    for start, length, layer in writes:
        end = min(SPAN, start + length)
        m.overlay(start, end, layer)
        model[start:end] = [layer] * (end - start)
    qend = min(SPAN, qstart + qlen)
    got = [ZERO] * SPAN
    pos = qstart
    for s, e, layer in m.lookup(qstart, qend):
        assert s == pos and e > s
        got[s:e] = [layer] * (e - s)
        pos = e
    assert pos == qend
    assert got[qstart:qend] == model[qstart:qend]
    extents = list(m.extents())
    for (_s1, e1, l1), (s2, _, l2) in zip(extents, extents[1:], strict=False):
        assert e1 <= s2, "extents overlap"
        assert not (e1 == s2 and l1 == l2), "touching twins were not merged"


def test_memory_grows_with_extents_not_size() -> None:
    m = ExtentMap()
    tib = 1 << 40
    m.overlay(0, tib, 0)
    m.overlay(tib // 2, tib // 2 + 4096, 1)
    assert len(m) == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, SPAN - 1), st.integers(1, 8)), max_size=6),
                min_size=1, max_size=6))
def test_bulk_sweep_and_layer_map_match_overlays(layers) -> None:
    """The O(n log n) bulk build and the base+head LayerMap agree with one-by-one overlays."""
    per_layer = []
    for extents in layers:           # make each layer's extents disjoint, like SEEK_DATA's
        m = ExtentMap()
        for start, length in extents:
            m.overlay(start, min(SPAN, start + length), 0)
        per_layer.append([(s, e) for s, e, _ in m.extents()])
    reference = ExtentMap()
    for index, extents in enumerate(per_layer):
        for s, e in extents:
            reference.overlay(s, e, index)
    swept = ExtentMap.sweep((s, e, i) for i, ext in enumerate(per_layer) for s, e in ext)
    assert list(swept.extents()) == list(reference.extents())
    lm = LayerMap.build(per_layer)
    assert list(lm.lookup(0, SPAN)) == list(reference.lookup(0, SPAN))
    lm.push_head()
    lm.overlay_head(3, 9)
    reference.overlay(3, 9, len(per_layer))
    assert list(lm.lookup(0, SPAN)) == list(reference.lookup(0, SPAN))
