"""dsv4-serve's pieces that need no server: the stack limit it starts tritonserver with, the
client command its banner prints."""

from __future__ import annotations

import resource

from dsv4.scripts.serve import client_command
from dsv4.scripts.stack_limit import MAX_STACK, MIN_STACK, plan

GIB = 1 << 30
INF = resource.RLIM_INFINITY


def test_stack_limit_is_raised_to_half_the_memory_within_bounds():
    assert plan(8 << 20, INF, 24 * GIB).after == 12 * GIB
    assert plan(8 << 20, INF, 1 * GIB).after == MIN_STACK
    assert plan(8 << 20, INF, 4096 * GIB).after == MAX_STACK
    raised = plan(8 << 20, INF, 24 * GIB)
    assert raised.raised and "raised from 8 MiB to 12.0 GiB" in raised.describe()


def test_unlimited_is_replaced_a_larger_limit_kept_and_the_hard_limit_respected():
    # unlimited makes glibc give threads a 2 MiB stack
    assert plan(INF, INF, 24 * GIB).after == 12 * GIB
    assert not plan(32 * GIB, INF, 24 * GIB).raised
    capped = plan(8 << 20, 512 << 20, 24 * GIB)
    assert capped.after == 512 << 20 and "the hard limit" in capped.describe()


def test_banner_client_command_works_from_the_users_shell(tmp_path, monkeypatch):
    bin_dir = tmp_path / "repo" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "dsv4-client").write_text("#!/bin/sh\n")
    (bin_dir / "dsv4-client").chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert client_command(bin_dir, tmp_path / "repo") == ".venv/bin/dsv4-client"
    assert client_command(bin_dir, tmp_path / "elsewhere") == str(bin_dir / "dsv4-client")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert client_command(bin_dir, tmp_path / "repo") == "dsv4-client"
