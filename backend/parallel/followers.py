"""Rank 0 of a served stage starts its follower ranks and watches them.

One process per extra rank (`stage_worker`), started with the Python that runs dsv4-serve (a
Triton stub's own `sys.executable` is the stub binary), joined through a loopback rendezvous with
a deadline, so a follower that cannot start fails the model's load instead of hanging it. A
follower that dies later makes `Followers.failure` say so: the adapter then refuses requests, and
the canary, hence health, fails (the collectives of a step in flight raise on the closed socket).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import threading
from datetime import timedelta

import torch.distributed as dist

from .group import MULTICAST_OFF, ParallelConfig, free_port, loopback_init_method, turn_off_multicast
from .replica import Leader
from .stage_worker import StageSpec

log = logging.getLogger(__name__)
JOIN_TIMEOUT = timedelta(seconds=180)


class Followers:
    def __init__(self, spec: StageSpec, python: str) -> None:
        parallel = ParallelConfig(spec.tensor_parallel, spec.expert_parallel)
        port = free_port()
        env = {**os.environ, **MULTICAST_OFF}
        self.processes: list[subprocess.Popen] = []
        self.failure: str | None = None
        for rank in range(1, parallel.world_size):
            worker = dataclasses.replace(spec, rank=rank, port=port)
            # output inherited: it lands in the server's log beside rank 0's
            self.processes.append(subprocess.Popen([python, "-m", "dsv4.backend.parallel.stage_worker", worker.to_json()],
                                                   env=env))
        turn_off_multicast()
        try:
            dist.init_process_group("gloo", init_method=loopback_init_method(port), rank=0,
                                    world_size=parallel.world_size, timeout=JOIN_TIMEOUT)
        except Exception:
            self.kill()
            raise
        self.group = dist.group.WORLD
        self.leader = Leader(self.group)
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_loop, name=f"dsv4-{spec.stage}-followers", daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        while not self._stop.wait(1.0):
            for rank, proc in enumerate(self.processes, start=1):
                if proc.poll() is not None and self.failure is None:
                    self.failure = f"tensor/expert-parallel rank {rank} exited (status {proc.returncode})"
                    log.error(self.failure)

    def stop(self) -> None:
        """Tell the followers to finish, then make sure they are gone."""
        self._stop.set()
        if self.failure is None:
            try:
                self.leader.stop()
            except Exception:  # a follower already gone: the others see rank 0 leave
                pass
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def kill(self) -> None:
        for proc in self.processes:
            proc.kill()


def stage_parallel(params: dict[str, str]) -> ParallelConfig:
    """The TP/EP degrees a stage's model parameters ask for (1, 1 when absent)."""
    return ParallelConfig(int(params.get("tensor_parallel", "1")), int(params.get("expert_parallel", "1")))


def start_followers(spec: StageSpec, python: str, model) -> Followers:
    """Start the stage's other ranks and make `model` (rank 0's full model) rank 0's shard."""
    from .parallelize import parallelize

    followers = Followers(spec, python)
    parallelize(model, ParallelConfig(spec.tensor_parallel, spec.expert_parallel), followers.group)
    return followers
