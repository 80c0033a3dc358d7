"""A served stage split over ranks: rank 0 runs the engine, the other ranks replay its state changes.

Every rank holds a shard of the model and a full replica of the KV cache (the shared K=V head is
not split, `shard.py`). Each forward pass all-reduces over the ranks, so all of them must make the
same model calls on the same cache state in the same order. The engines decide what to run from
thread timing (arrivals, cancellations), which only rank 0 sees; so rank 0's engine talks to
proxies of its cache, decode runner and prefill stage that broadcast every call that changes state
(admit, import, add/remove a row, step, release; begin/step/abort a prompt) before running it, and
the other ranks run `follow`, replaying each call on their own objects. Calls carry request keys,
not objects: a follower's cache hands out the same blocks for the same calls, so keys suffice.
Reads (can_admit, usage, stats) are answered by rank 0's objects alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from ..serving.decode_engine import DecodeEngine
from ..serving.handoff import import_state

log = logging.getLogger(__name__)
STOP = "stop"


class Leader:
    """Rank 0's end of the command channel."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def send(self, name: str, *args: Any) -> None:
        dist.broadcast_object_list([(name, args)], src=0, group=self.group)

    def send_cleanup(self, name: str, *args: Any) -> None:
        """A release, row removal or abort: it runs inside the engines' error handling, so a broken group (a rank
        gone) must not raise here as well; the stage refuses new requests once a rank is gone."""
        try:
            self.send(name, *args)
        except Exception as exc:
            log.error("could not send %s to the other ranks: %s", name, exc)

    def stop(self) -> None:
        self.send(STOP)


def follow(handlers: dict[str, Callable[..., Any]], group: dist.ProcessGroup) -> None:
    """A follower's loop: run each command rank 0 sends until it sends STOP. A command that raises
    raised on rank 0 too (same call, same state), where the engine handles it: log it and go on."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        name, args = box[0]
        if name == STOP:
            return
        try:
            handlers[name](*args)
        except Exception:
            log.exception("rank %d: %s failed (as it did on rank 0)", dist.get_rank(), name)


class _Proxy:
    """Reads go to the wrapped object; the subclasses' methods broadcast, then run here."""

    def __init__(self, target: Any, leader: Leader) -> None:
        self._target, self._leader = target, leader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class ReplicatedCache(_Proxy):
    """A decode stage's `PagedCache` whose reservations and imports every rank makes."""

    def admit(self, rid: str, num_tokens: int, *args: Any, **kwargs: Any):
        self._leader.send("admit", rid, num_tokens, args, kwargs)
        return self._target.admit(rid, num_tokens, *args, **kwargs)

    def release(self, rid: str) -> None:
        self._leader.send_cleanup("release", rid)
        self._target.release(rid)


class ReplicatedRunner(_Proxy):
    """A `DecodeRunner` whose rows and steps every rank runs (rows named by their request key)."""

    def __init__(self, target: Any, leader: Leader, cache: Any) -> None:
        super().__init__(target, leader)
        self._cache = cache

    def add(self, seq, *args: Any) -> int:
        rid = next(key for key, held in self._cache.seqs.items() if held is seq)
        self._leader.send("add", rid, args)
        return self._target.add(seq, *args)

    def remove(self, row: int):
        self._leader.send_cleanup("remove", row)
        return self._target.remove(row)

    def step(self):
        self._leader.send("step")
        return self._target.step()


def decode_handlers(cache, runner) -> dict[str, Callable[..., Any]]:
    """What a decode follower does for each command, on its own cache and runner."""
    return {
        "admit": lambda rid, n, args, kwargs: cache.admit(rid, n, *args, **kwargs),
        "import_state": lambda rid, header, payload: import_state(cache.storage, cache.seqs[rid], header, payload),
        "release": cache.release,
        "add": lambda rid, args: runner.add(cache.seqs[rid], *args),
        "remove": runner.remove,
        "step": runner.step,
    }


class ReplicatedStage(_Proxy):
    """A `PrefillStage` whose prompts every rank begins, steps and aborts (jobs named by their key)."""

    def begin(self, input_ids, config):
        self._leader.send("begin", input_ids, config)
        return self._target.begin(input_ids, config)

    def step(self, plan):
        self._leader.send("step", [(job.key, end) for job, end in plan])
        return self._target.step(plan)

    def abort(self, job) -> None:
        self._leader.send_cleanup("abort", job.key)
        self._target.abort(job)


def prefill_handlers(stage) -> dict[str, Callable[..., Any]]:
    """What a prefill follower does for each command, on its own stage; jobs are found by key."""
    jobs: dict[str, Any] = {}

    def begin(input_ids, config) -> None:
        job = stage.begin(input_ids, config)
        if job is not None:
            jobs[job.key] = job

    def step(plan) -> None:
        finished = stage.step([(jobs[key], end) for key, end in plan])
        for job, _ in finished:  # step exported and released them, as on rank 0
            jobs.pop(job.key, None)

    def abort(key: str) -> None:
        job = jobs.pop(key, None)
        if job is not None:
            stage.abort(job)

    return {"begin": begin, "step": step, "abort": abort}


class ReplicatedDecodeEngine(DecodeEngine):
    """Rank 0's decode engine: its cache, runner and state imports go through the command channel."""

    def __init__(self, *args: Any, leader: Leader, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.leader = leader
        self.cache = ReplicatedCache(self.cache, leader)
        self.runner = ReplicatedRunner(self.runner, leader, self.cache)

    def _import_state(self, rid: str, seq, header, payload) -> None:
        self.leader.send("import_state", rid, header, payload)
        super()._import_state(rid, seq, header, payload)
