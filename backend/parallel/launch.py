"""One process per rank on this host, joined in one group through a loopback rendezvous."""

from __future__ import annotations

import dataclasses

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .group import free_port, join_group, loopback_init_method, turn_off_multicast


def _rank_main(rank: int, fn: Callable, world_size: int, init_method: str, device: str, threads: int,
               results_dir: str, args: tuple) -> None:
    torch.set_num_threads(threads)
    group = join_group(rank, world_size, init_method, device)
    try:
        result = fn(group, *args)
        torch.save(_on_cpu(result), Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _on_cpu(value: Any) -> Any:
    """A rank's result with its tensors on the CPU: the parent process need not touch a GPU to read it."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _on_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)
                                             if f.init})
    return value


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, device: str = "cpu",
                threads: int | None = None) -> list[Any]:
    """Run `fn(group, *args)` on `world_size` new processes; returns each rank's return value.

    `fn` must be importable by name (a module-level function) and its arguments picklable. A rank
    that raises stops the others, and the error is raised here. `threads` per rank defaults to an
    even share of this host's cores: ranks that oversubscribe the cores wait on each other's spins.
    """
    turn_off_multicast()  # inherited by the children before anything in them touches a GPU
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    # ranks fork from a server process that imported torch (and fn's module) once and has started no
    # threads and touched no device: a fresh interpreter per rank would import torch again (seconds each)
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", fn.__module__])
    with tempfile.TemporaryDirectory(prefix="dsv4-ranks-") as results_dir:
        mp.start_processes(_rank_main, nprocs=world_size, join=True, start_method="forkserver",
                           args=(fn, world_size, loopback_init_method(free_port()), device, threads, results_dir, args))
        return [torch.load(Path(results_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
