"""Ending a tritonserver that was sent SIGTERM, without waiting on references clients hold.

Triton 2.51 does not unload a model while a client keeps open a gRPC stream that used it, nor
after a stream whose request Triton itself rejected was dropped without being closed (the same
symptom as upstream server#7626). Shutdown then waits out the whole exit timeout and blocks in
the gRPC shutdown for as long as such a client stays connected.

Triton logs "All models are stopped" once no inference is in flight and every scheduler has
stopped taking new ones; from then on it only unloads. When that unloading stops making progress
(no backend stub exits for a few seconds) what is left is held by client streams alone, and
nothing is lost by ending the process. Its shared-memory regions are removed with it: Triton
unlinks them only when a model unloads.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ALL_STOPPED = "All models are stopped"
SHM_PREFIX = "/dev/shm/triton_python_backend_shm_region_"


def wait_for_exit(proc: subprocess.Popen, log_path: Path, log_offset: int, timeout: float, stall_s: float = 4.0) -> bool:
    """Wait for `proc` to exit; True if it had to be ended because only client streams held it."""
    end = time.monotonic() + timeout
    stopped = False
    stubs, changed_at = None, time.monotonic()
    while time.monotonic() < end:
        try:
            proc.wait(0.25)
            return False
        except subprocess.TimeoutExpired:
            pass
        stopped = stopped or ALL_STOPPED in _log_since(log_path, log_offset)
        now = set(child_pids(proc.pid))
        if now != stubs:
            stubs, changed_at = now, time.monotonic()
        if stopped and time.monotonic() - changed_at > stall_s:
            print(f"dsv4-serve: nothing in flight and unloading stalled ({len(now)} stubs of models still referenced "
                  "by client gRPC streams); ending tritonserver", file=sys.stderr, flush=True)
            _kill(proc)
            return True
    _kill(proc)
    return False


def _kill(proc: subprocess.Popen) -> None:
    regions = shm_regions(proc.pid)
    proc.kill()
    proc.wait()
    for region in regions:  # the stubs, killed by their watchdogs, need them no more
        Path(region).unlink(missing_ok=True)


def _log_since(log_path: Path, offset: int) -> str:
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def child_pids(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (tritonserver's children are its backend stubs)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name in field 2 may hold spaces and parentheses: split after the last ')'
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(entry.name))
    return children


def shm_regions(pid: int) -> set[str]:
    """The Python backend's shared-memory files that `pid` has mapped."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split(None, 5)[5].removesuffix(" (deleted)") for line in maps.splitlines()
            if SHM_PREFIX in line and len(line.split(None, 5)) == 6}
