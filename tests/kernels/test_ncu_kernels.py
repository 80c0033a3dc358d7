"""scripts/ncu_kernels.py without a GPU: which kernels it asks ncu for, and how it reads ncu's CSV pages
(made-up pages in ncu's format: `==PROF==` lines first, quoted fields, thousands separators)."""

from __future__ import annotations

import math

from dsv4.kernels.benchmarking import ONCE_ENV, time_us
from dsv4.scripts import ncu_kernels

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _row(launch, kernel, section, metric, unit, value, grid="(128, 1, 5)"):
    return (f'"{launch}","7","python","h","{kernel}","1","13","(256, 1, 1)","{grid}","0","9.0","{section}",'
            f'"{metric}","{unit}","{value}"')


DETAILS = "\n".join([
    "==PROF== Connected to process 7",
    HEAD,
    _row(0, "sparse_attn_fwd_kernel", "GPU Speed Of Light Throughput", "Duration", "msecond", "1.25"),
    _row(1, "sparse_attn_combine_kernel", "GPU Speed Of Light Throughput", "Duration", "ns", "4,096"),
    _row(1, "sparse_attn_combine_kernel", "Memory Workload Analysis", "Memory Throughput", "Gbyte/s", "812.5"),
    _row(0, "sparse_attn_fwd_kernel", "Memory Workload Analysis", "Memory Throughput", "furlong/fortnight", "3"),
    _row(2, "sparse_attn_fwd_kernel", "GPU Speed Of Light Throughput", "Duration", "usecond", "261.70"),
    _row(2, "sparse_attn_fwd_kernel", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "12.5"),
    _row(2, "sparse_attn_fwd_kernel", "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "40.1"),
    _row(2, "sparse_attn_fwd_kernel", "Memory Workload Analysis", "Memory Throughput", "Tbyte/second", "0.53"),
    _row(2, "sparse_attn_fwd_kernel", "Occupancy", "Achieved Occupancy", "%", "11.9"),
    _row(2, "sparse_attn_fwd_kernel", "Launch Statistics", "Registers Per Thread", "register/thread", "255"),
    _row(2, "sparse_attn_fwd_kernel", "Warp State Statistics", "Warp Cycles Per Issued Instruction", "cycle", "n/a"),
])
RAW = "\n".join([
    '"ID","Kernel Name","sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",'
    '"sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active","dram__bytes.sum"',
    '"","","%","%","byte"',
    '"0","sparse_attn_fwd_kernel","1.0","3.5","1,000"',
    '"2","sparse_attn_fwd_kernel","2.0","31.25","1,000"',
])


def test_kernel_names_are_this_projects_triton_kernels():
    names = ncu_kernels.kernel_names()
    assert {"sparse_attn_fwd_kernel", "sparse_attn_combine_kernel", "indexer_score_kernel", "moe_combine_kernel"} <= set(names)
    assert all(n.endswith("_kernel") for n in names)
    cmd = ncu_kernels.ncu_command("ncu", ncu_kernels.Path("/tmp/r"), names, 9, ["--ops", "sparse_decode"])
    assert cmd[:3] == ["ncu", "--clock-control", "none"] and "--launch-count" in cmd and cmd[-2:] == ["--ops", "sparse_decode"]
    assert cmd[cmd.index("--nvtx-include") + 1] == "dsv4_timed/"  # the timed call only: warm launches
    assert cmd[cmd.index("--kernel-name") + 1].startswith("regex:^(") and "sparse_attn_fwd_kernel|" in " ".join(cmd)


def test_details_and_raw_pages_become_one_row_per_launch():
    details = ncu_kernels.parse_details(DETAILS)
    # both spellings of the units; one ncu does not use is kept out of the figures and named
    assert details["0"]["duration"] == 1250.0 and details["1"]["duration"] == 4.096 and details["1"]["dram_rate"] == 812.5
    assert "dram_rate" not in details["0"] and details["0"]["unknown_units"] == ["Memory Throughput in 'furlong/fortnight'"]
    pipes = ncu_kernels.parse_tensor_pipes(RAW)
    assert pipes == {"0": 3.5, "2": 31.25}  # the busiest tensor pipe of each launch
    rows = ncu_kernels.summary_rows(details, pipes, "sparse_decode flash B=128 ctx=8192")
    assert [(r["launch"], r["kernel"]) for r in rows] == [
        (0, "sparse_attn_fwd_kernel"), (1, "sparse_attn_combine_kernel"), (2, "sparse_attn_fwd_kernel")]
    fwd = rows[2]
    assert fwd["duration"] == 261.7 and fwd["dram_rate"] == 530.0
    assert (fwd["dram_pct"], fwd["sm_pct"], fwd["occupancy_pct"], fwd["registers"]) == (12.5, 40.1, 11.9, 255.0)
    assert fwd["cycles_per_issue"] is None and fwd["tensor_pipe_pct"] == 31.25  # "n/a" is not a number
    table = ncu_kernels.markdown(rows)
    assert "| sparse_decode flash B=128 ctx=8192 | sparse_attn_fwd_kernel | (128, 1, 5) | 261.7 | 530 |" in table
    assert ncu_kernels.parse_details("") == {} and ncu_kernels.parse_tensor_pipes("==PROF== nothing\n") == {}


def test_no_ncu_is_a_clear_error(capsys):
    assert ncu_kernels.main(["--ncu", "/nonexistent/ncu"]) == 2
    assert "no ncu at '/nonexistent/ncu'" in capsys.readouterr().err


def test_once_mode_runs_the_timed_function_once(monkeypatch):
    calls = []
    monkeypatch.setenv(ONCE_ENV, "1")
    assert math.isnan(time_us(lambda: calls.append(1), graph=True)) and calls == [1]
