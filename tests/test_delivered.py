"""protocol/delivered.py: text already sent is never contradicted, whatever a failover does to the replay."""

from __future__ import annotations

import gc

import pytest

from broker_worker.protocol.delivered import Delivered
from broker_worker.protocol.errors import JobError
from broker_worker.protocol.messages import Delta, Done, Started, Usage


def _delivered(count: int) -> Delivered:
    delivered = Delivered("job-1", 0)
    delivered.add(Started(seq=1, worker="w1"))
    for seq in range(2, count + 1):
        delivered.add(Delta(seq=seq, text=f"piece {seq} "))
    return delivered


def test_a_repeated_event_with_the_same_content_is_fine() -> None:
    delivered = _delivered(10)
    delivered.check_again(Started(seq=1, worker="w1"))
    delivered.check_again(Delta(seq=7, text="piece 7 "))
    delivered.check_replay([Delta(seq=10, text="piece 10 ")])


@pytest.mark.parametrize(
    "other",
    [Delta(seq=7, text="piece 7!"), Started(seq=1, worker="w2"), Done(seq=7, finish_reason="stop", usage=Usage())],
)
def test_a_seq_that_comes_back_with_other_content_ends_the_stream(other: Delta | Started | Done) -> None:
    with pytest.raises(JobError, match="came back with other content"):
        _delivered(10).check_again(other)


def test_a_replay_that_lost_the_last_delivered_event_ends_the_stream() -> None:
    with pytest.raises(JobError, match="seq 10 was delivered, Redis no longer has it"):
        _delivered(10).check_replay([Delta(seq=9, text="piece 9 ")])


def test_what_is_kept_per_stream_is_invisible_to_the_garbage_collector() -> None:
    delivered = _delivered(Delivered.KEEP + 50)
    assert not gc.is_tracked(delivered._recent)  # a gateway keeps this for every open stream
    assert len(delivered._recent) == Delivered.KEEP
