"""edgeq.model.sequential: the held-out split shared by the example split and LSI's head rows."""

from __future__ import annotations

from edgeq.model.sequential import _split
from edgeq.model.sequential.blocks import held_out_count


def test_held_out_count_is_the_last_quarter_from_four_on():
    assert [held_out_count(n) for n in (0, 1, 3, 4, 7, 8, 100, 8192)] == [0, 0, 0, 1, 1, 2, 25, 2048]


def test_split_holds_out_the_last_quarter():
    texts = [(str(i), None) for i in range(10)]
    fit, ho = _split(texts)
    assert fit == texts[:8] and ho == texts[8:]
    assert _split(texts[:3]) == (texts[:3], [])
