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


def test_gpu_pools_default_to_measured_and_cpu_pools_to_fixed_sizes(tmp_path):
    from dsv4.scripts.serve import device_defaults, parse_args, template_values

    split = parse_args(["--device", "cuda", "--gpu-memory-utilization", "0.8", "--prefill-memory-share", "0.25",
                        "--stage-layout", "split"])
    device_defaults(split)
    values = template_values(split, tmp_path)
    assert values["kv_cache_bytes"] == values["prefix_cache_bytes"] == "0"  # 0: sized after the warm-up
    assert float(values["decode_memory_fraction"]) == 0.6 and values["prefill_memory_fraction"] == "0=0.2000"
    assert values["colocated_prefill"] == "no"
    # on a GPU prefill runs in decode's process by default: decode's share is the whole of it
    gpu = parse_args(["--device", "cuda", "--gpu-memory-utilization", "0.8", "--prefill-memory-share", "0.25"])
    device_defaults(gpu)
    values = template_values(gpu, tmp_path)
    assert gpu.stage_layout == "colocated" and values["colocated_prefill"] == "yes"
    assert float(values["decode_memory_fraction"]) == 0.8 and float(values["prefill_kv_share"]) == 0.25
    pinned = parse_args(["--device", "cuda", "--kv-cache-gib", "2"])
    device_defaults(pinned)
    assert template_values(pinned, tmp_path)["kv_cache_bytes"] == str(2 * GIB)
    cpu = parse_args(["--device", "cpu"])
    device_defaults(cpu)
    assert template_values(cpu, tmp_path)["kv_cache_bytes"] == str(GIB // 2) and cpu.stage_layout == "split"


def test_colocated_repository_has_no_prefill_model_and_a_two_step_ensemble(tmp_path):
    from dsv4.scripts.serve import device_defaults, parse_args, template_values
    from dsv4.scripts.triton_launcher import COLOCATED_MODELS, SPLIT_MODELS, build_repository

    args = parse_args(["--device", "cpu", "--stage-layout", "colocated"])
    device_defaults(args)
    repo = build_repository(tmp_path / "c", template_values(args, tmp_path), COLOCATED_MODELS, "colocated")
    ensemble = (repo / "dsv4" / "config.pbtxt").read_text()
    assert not (repo / "prefill").exists() and not list(repo.glob("*/config.*.pbtxt"))
    assert 'model_name: "prefill"' not in ensemble and 'key: "input_ids" value: "_input_ids"' in ensemble
    assert 'key: "colocated_prefill" value { string_value: "yes" }' in (repo / "decode" / "config.pbtxt").read_text()
    split = build_repository(tmp_path / "s", template_values(args, tmp_path), SPLIT_MODELS, "split")
    assert 'model_name: "prefill"' in (split / "dsv4" / "config.pbtxt").read_text()


def test_memory_split_line_reads_the_stages_gauges(monkeypatch):
    import io

    from dsv4.scripts import serve

    text = "\n".join(f'dsv4_gpu_memory_bytes{{part="{part}",stage="{stage}"}} {value * GIB}'
                     for stage in ("decode", "prefill") for part, value in
                     (("share", 80), ("weights", 3), ("working", 1), ("kv", 75.5))) + "\nnv_other 1\n"
    monkeypatch.setattr(serve.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    line = serve.memory_split("http://x/metrics")
    assert line.startswith("decode 80.0 GiB = weights 3.0 + working 1.0 + KV 75.5; prefill 80.0 GiB")
    shared = text + f'\ndsv4_gpu_memory_bytes{{part="kv_prefix",stage="decode"}} {20 * GIB}'
    monkeypatch.setattr(serve.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(shared.encode()))
    assert serve.memory_split("http://x/metrics").startswith("decode 80.0 GiB = weights 3.0 + working 1.0 + KV 75.5 (prefix cache 20.0)")
    monkeypatch.setattr(serve.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"nv_other 1\n"))
    assert serve.memory_split("http://x/metrics") is None


def test_parallel_degrees_are_checked_before_the_server_starts(tiny_dir):
    import sys

    import pytest

    from dsv4.scripts.serve import LaunchError, device_defaults, parse_args, template_values, validate

    def checked(*argv):
        args = parse_args(["--model", str(tiny_dir), *argv])
        device_defaults(args)
        validate(args)
        return args

    args = checked("--tensor-parallel", "2", "--expert-parallel", "2")
    values = template_values(args, tiny_dir)
    assert (values["tensor_parallel"], values["expert_parallel"], values["python"]) == ("2", "2", sys.executable)
    for argv, words in ((["--tensor-parallel", "3"], "--tensor-parallel 3"),
                        (["--tensor-parallel", "2", "--expert-parallel", "4"], "each must be 1 or equal"),
                        (["--expert-parallel", "2", "--stage-layout", "colocated"], "--stage-layout split"),
                        (["--tensor-parallel", "0"], "positive integer")):
        with pytest.raises(LaunchError, match=words):
            checked(*argv)
    from dsv4.backend.config import load_config
    from dsv4.scripts.serve import _validate_parallel

    on_gpu = parse_args(["--model", str(tiny_dir), "--device", "cuda", "--tensor-parallel", "2", "--stage-layout", "split"])
    with pytest.raises(LaunchError, match="CPU only for now"):  # checked past the GPU count: this host has none
        _validate_parallel(on_gpu, load_config(tiny_dir))
