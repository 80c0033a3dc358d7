"""Decode's sender keeps at most `limit` chunks in flight to stream_guard, reading its counter."""

import random

import pytest

from dsv4.backend.serving.response_pacing import Pacer, ProgressCounter, counter_reader


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_counter_crosses_processes_through_the_mapping(tmp_path):
    path = tmp_path / "progress"
    read = counter_reader(path)
    assert read() is None  # stream_guard has not started yet
    counter = ProgressCounter(path)
    assert read() == 0
    counter.add(3)
    counter.add(2**40)
    assert read() == 3 + 2**40
    counter.close()
    assert not path.exists()


def test_room_follows_what_the_guard_has_taken():
    done, clock = [0], Clock()
    pacer = Pacer(lambda: done[0], limit=4, idle_resync_s=0.05, clock=clock)
    assert pacer.room() == 4
    pacer.record(4)
    assert pacer.room() == 0
    done[0] = 1
    assert pacer.room() == 1
    pacer.record(1)
    done[0] = 5
    assert pacer.room() == 4


def test_no_counter_means_no_limit():
    pacer = Pacer(lambda: None, limit=2)
    pacer.record(10)
    assert pacer.room() is None


def test_counts_before_the_first_read_and_the_guards_earlier_work_do_not_count():
    done, clock = [None], Clock()
    pacer = Pacer(lambda: done[0], limit=4, clock=clock)
    pacer.record(7)  # sent while the counter did not exist yet
    assert pacer.room() is None
    done[0] = 1000  # the guard passed on chunks before (the canary, other pacers)
    assert pacer.room() == 4
    pacer.record(2)
    assert pacer.room() == 2


def test_chunks_that_never_reach_the_guard_are_written_off_once_it_idles():
    done, clock = [0], Clock()
    pacer = Pacer(lambda: done[0], limit=4, idle_resync_s=0.05, clock=clock)
    assert pacer.room() == 4
    pacer.record(4)  # their ensemble requests were cancelled: the guard never sees them
    assert pacer.room() == 0
    clock.now += 0.01
    assert pacer.room() == 0  # too soon to tell
    clock.now += 0.05
    assert pacer.room() == 4
    pacer.record(2)
    done[0] = 2  # later chunks are counted normally
    assert pacer.room() == 4


def test_a_busy_guard_is_not_written_off():
    done, clock = [0], Clock()
    pacer = Pacer(lambda: done[0], limit=8, idle_resync_s=0.05, clock=clock)
    rng = random.Random(3)
    sent = 0
    for _ in range(500):  # the guard takes a chunk every ~1 ms, never idle for 50 ms
        room = pacer.room()
        assert 0 <= room <= 8
        n = rng.randrange(room + 1)
        pacer.record(n)
        sent += n
        if done[0] < sent:
            done[0] += 1
        clock.now += 0.001
        assert pacer.in_flight() == sent - done[0]


@pytest.mark.parametrize("limit", [1, 16])
def test_room_is_never_negative(limit):
    pacer = Pacer(lambda: 0, limit=limit, clock=Clock())
    assert pacer.room() == limit
    pacer.record(limit + 5)
    assert pacer.room() == 0
