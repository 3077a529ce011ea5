"""Pure logic without a backend: the commit metadata of finished offsets."""

from __future__ import annotations

from flowcraft_kafka._kafka import _Partition, _skipped


def test_metadata_lists_offsets_done_past_the_first_unfinished() -> None:
    state = _Partition(epoch=1, open={10, 12, 20}, next_offset=25)
    assert state.committable() == 10
    text = state.metadata()
    assert text == "fc1:1,3-9,11-14"
    assert _skipped(10, text) == {11, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 24}


def test_nothing_open_means_nothing_to_skip() -> None:
    state = _Partition(epoch=1, open=set(), next_offset=7)
    assert state.committable() == 7
    assert state.metadata() == ""
    assert _skipped(7, "") == set()


def test_unreadable_metadata_skips_nothing() -> None:
    for text in ("garbage", "fc1:x", "fc1:0", "fc1:5-2", "fc1:1-99999999", None):
        assert _skipped(10, text) == set()


def test_long_metadata_is_cut_at_a_range() -> None:
    state = _Partition(epoch=1, open=set(range(0, 20_000, 2)), next_offset=20_000)
    text = state.metadata()
    assert len(text) <= 3000
    assert text.startswith("fc1:1,3,5")
    assert not text.endswith(",")
    assert _skipped(0, text) <= set(range(1, 20_000, 2))
