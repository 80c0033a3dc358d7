"""The stack size tritonserver needs to survive any request body.

Triton 2.51's HTTP front end (libevhtp) parses a body sent as `application/x-www-form-urlencoded`
(what `curl -d` sends) into two buffers on the HTTP thread's stack, each the size of the body,
and keeps one 16-byte entry per body segment on that stack as well (CVE-2025-23310). With the
usual 8 MiB limit a 5 MB body kills the server with SIGSEGV before any model sees it. Thread
stacks take their size from RLIMIT_STACK when the process starts, so the launcher raises it
for tritonserver only: half of the machine's memory (at least 1 GiB, at most 64 GiB), which
lets a body use its memory up before it can use the stack up. The pages are reserved, not
used, until a request needs them.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass

MIN_STACK = 1 << 30
MAX_STACK = 64 << 30


@dataclass(frozen=True)
class StackLimit:
    before: int  # soft RLIMIT_STACK this process had (resource.RLIM_INFINITY for unlimited)
    after: int  # what tritonserver starts with
    hard: int

    @property
    def raised(self) -> bool:
        return self.after != self.before

    def describe(self) -> str:
        why = "Triton's HTTP threads hold twice a form-encoded body on their stack"
        if not self.raised:
            return f"stack limit {_size(self.after)} ({why})"
        note = ", the hard limit" if self.after == self.hard else ""
        return f"stack limit raised from {_size(self.before)} to {_size(self.after)}{note} for tritonserver ({why})"


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def wanted_stack(memory: int) -> int:
    return min(MAX_STACK, max(MIN_STACK, memory // 2))


def plan(soft: int, hard: int, memory: int) -> StackLimit:
    """The limit to start tritonserver with, given this process's limits and the machine's memory.

    An unlimited soft limit is replaced too: glibc then gives threads a 2 MiB default stack.
    """
    want = wanted_stack(memory)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft >= want:
        return StackLimit(soft, soft, hard)
    return StackLimit(soft, want, hard)


def current_plan() -> StackLimit:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    return plan(soft, hard, memory_bytes())


@contextlib.contextmanager
def stack_limit_for_children(limit: StackLimit) -> Iterator[None]:
    """Set the soft stack limit that a child started inside the block inherits, then restore it.

    The parent's own threads keep the stack size glibc chose at its start, so this changes
    nothing for the parent.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    if limit.after != soft:
        resource.setrlimit(resource.RLIMIT_STACK, (limit.after, hard))
    try:
        yield
    finally:
        if limit.after != soft:
            resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


def _size(n: int) -> str:
    if n == resource.RLIM_INFINITY:
        return "unlimited"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.0f} MiB"
