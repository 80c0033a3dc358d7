"""Where dsv4-serve puts the stages on a host with several GPUs (`--decode-gpus`, `--prefill-gpus`):
the instance groups, each instance's memory share and the refusals, checked without a GPU."""

from __future__ import annotations

import pytest

from dsv4.backend.serving.triton_io import memory_fraction
from dsv4.scripts.serve import LaunchError, device_defaults, parse_args, template_values, validate
from dsv4.scripts.stage_gpus import PlacementError, StageGpus, parse_gpus
from dsv4.scripts.triton_launcher import SPLIT_MODELS, ServerOptions, build_repository, server_command


def _args(*argv):
    args = parse_args(["--device", "cuda", "--gpu-memory-utilization", "0.8", "--prefill-memory-share", "0.25", *argv])
    device_defaults(args)
    return args


def test_default_pins_both_stages_to_gpu_0():
    gpus = StageGpus.from_options(None, None)
    assert (gpus.decode, gpus.prefill, gpus.disaggregated, gpus.used) == (0, (0,), False, (0,))
    assert StageGpus.instance_gpus((0,)) == ", gpus: [ 0 ]"


def test_prefill_on_other_gpus_gets_their_whole_share_and_decode_its_own():
    apart = StageGpus.from_options("1", "0")
    assert apart.disaggregated and apart.used == (0, 1)
    assert apart.decode_fraction(0.8, 0.25, colocated=False) == pytest.approx(0.8)
    assert apart.prefill_fractions(0.8, 0.25) == "0=0.8000"
    shared = StageGpus.from_options("1", "0,1")  # one prefill instance beside decode, one alone
    assert shared.decode_fraction(0.8, 0.25, colocated=False) == pytest.approx(0.6)
    assert shared.prefill_fractions(0.8, 0.25) == "0=0.8000,1=0.2000"
    assert memory_fraction({"memory_fraction": "0=0.8000,1=0.2000"}, "cuda:1") == pytest.approx(0.2)
    assert memory_fraction({"memory_fraction": "0.6000"}, "cuda:3") == pytest.approx(0.6)
    with pytest.raises(ValueError, match="no share for GPU 2"):
        memory_fraction({"memory_fraction": "0=0.8000"}, "cuda:2")


@pytest.mark.parametrize("decode,prefill,message", [
    ("0,1", None, "--decode-gpus 0,1: decode runs one engine on one GPU"),
    ("x", None, "--decode-gpus 'x': expected GPU indices"),
    (None, "1,1", "--prefill-gpus '1,1': a GPU is listed twice"),
    (None, "-1", "GPU indices are integers >= 0"),
    (None, "", "expected GPU indices"),
])
def test_bad_gpu_lists_name_the_option(decode, prefill, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(")):
        StageGpus.from_options(decode, prefill)


def test_gpus_the_host_lacks_and_colocated_prefill_elsewhere_are_refused():
    with pytest.raises(PlacementError, match="GPU 1 is not there: this process sees 1 GPU"):
        StageGpus.from_options("0", "1").check(visible=1, colocated=False)
    with pytest.raises(PlacementError, match="need --stage-layout split"):
        StageGpus.from_options("0", "1").check(visible=2, colocated=True)
    StageGpus.from_options("1", "0").check(visible=2, colocated=False)
    assert parse_gpus("2,0", "--prefill-gpus") == (2, 0)


def test_repository_places_each_stage_on_its_gpus(tmp_path):
    args = _args("--decode-gpus", "1", "--prefill-gpus", "0,2")
    assert args.stage_layout == "split"  # auto: prefill elsewhere runs in its own process
    values = template_values(args, tmp_path)
    assert float(values["decode_memory_fraction"]) == pytest.approx(0.8)
    repo = build_repository(tmp_path / "r", values, SPLIT_MODELS, "split")
    assert "count: 1, gpus: [ 1 ] }" in (repo / "decode" / "config.pbtxt").read_text()
    prefill = (repo / "prefill" / "config.pbtxt").read_text()
    assert "count: 1, gpus: [ 0, 2 ] }" in prefill and 'string_value: "0=0.8000,2=0.8000"' in prefill
    # one GPU, the default: still pinned, and colocated
    default = _args()
    assert default.stage_layout == "colocated" and template_values(default, tmp_path)["decode_gpus"] == ", gpus: [ 0 ]"
    cpu = parse_args(["--device", "cpu"])
    device_defaults(cpu)
    assert template_values(cpu, tmp_path)["decode_gpus"] == ""  # KIND_CPU takes no GPU list


def test_every_stage_gpu_gets_a_cuda_pool(tmp_path):
    from dsv4.scripts.triton_launcher import TritonBundle

    bundle = TritonBundle(server=tmp_path / "tritonserver", backend_dir=tmp_path, stub=tmp_path / "stub", libs=None)
    cmd = server_command(bundle, tmp_path, tmp_path, ServerOptions(cuda_pool_bytes=1 << 20, cuda_pool_gpus=(0, 2)))
    assert [a for a in cmd if a.startswith("--cuda-memory-pool")] == [
        "--cuda-memory-pool-byte-size=0:1048576", "--cuda-memory-pool-byte-size=2:1048576"]


def test_gpu_options_on_a_cpu_server_are_refused(tiny_dir):
    args = parse_args(["--model", str(tiny_dir), "--prefill-gpus", "1"])
    with pytest.raises(LaunchError, match="need --device cuda"):
        validate(args)
