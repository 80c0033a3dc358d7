"""CPU-side parts of scripts/bench_kernels.py and the benchmark harness: arguments, plan, rows, table."""

from __future__ import annotations

import pytest

from dsv4.kernels.benchmarking import BenchRow, Ceilings, markdown_table, skipped
from dsv4.scripts.bench_kernels import OPS, header, main, parse_args, plan


def test_defaults_cover_both_models_all_batches_and_contexts():
    args = parse_args([])
    assert args.ops == list(OPS) and args.models == ["flash", "pro"]
    assert args.batches == [1, 16, 64, 128] and args.contexts == [8192, 131072, 1 << 20]
    runs = plan(args)
    decode = [r for r in runs if r.op == "sparse_decode"]
    assert len(decode) == 2 * 4 * 3
    assert {r.context for r in runs if r.op == "compressor"} == {8192}  # context-free op: first context only
    assert {r.batch for r in runs if r.op == "sparse_prefill"} == {1}


def test_suffixes_filters_and_errors(capsys):
    args = parse_args(["--ops", "indexer_topk", "--models", "pro", "--batches", "2", "--contexts", "8k,1m"])
    assert [(r.op, r.model, r.batch, r.context) for r in plan(args)] == [
        ("indexer_topk", "pro", 2, 8192), ("indexer_topk", "pro", 2, 1 << 20)]
    with pytest.raises(SystemExit):
        parse_args(["--ops", "nope"])
    with pytest.raises(SystemExit):
        parse_args(["--models", "gpt"])
    assert main(["--dry-run", "--ops", "kv_format", "--models", "flash", "--batches", "1"]) == 0
    assert "1 runs" in capsys.readouterr().out


def test_rows_and_table():
    ceil = Ceilings(hbm_gbps=4000.0, bf16_tflops=800.0, device_name="test GPU")
    mem = BenchRow("op.mem", "cfg", us=10.0, bytes=20_000_000, flops=1_000_000, ref_us=50.0)
    comp = BenchRow("op.compute", "cfg", us=10.0, bytes=1000, flops=4_000_000_000)
    assert mem.gbps() == pytest.approx(2000.0) and mem.roofline(ceil) == pytest.approx(0.5)
    assert comp.tflops() == pytest.approx(400.0) and comp.roofline(ceil) == pytest.approx(0.5)
    assert mem.speedup() == pytest.approx(5.0) and comp.speedup() is None
    table = markdown_table([mem, comp, skipped("op.big", "cfg", "does not fit")], ceil)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[0].startswith("| op | config | µs")
    assert "| 50% |" in lines[2] and "5.0x" in lines[2]
    assert "skipped: does not fit" in lines[4] and "| - |" in lines[4]
    meta = dict(date="d", torch="t", triton="tr", commit="c", command="python scripts/bench_kernels.py")
    assert "copy 4000 GB/s" in header(meta, ceil)




def _tiny():
    from dsv4.kernels.benchmarking import ModelShape

    return ModelShape("tiny", heads=4, topk=16, window=16, head_dim=128, rope_dim=64, index_heads=4, index_dim=128,
                      csa_rate=4, hca_rate=16, block_positions=64)


@pytest.mark.parametrize("op", ["kv_format", "sparse_decode", "indexer_topk", "compressor", "sparse_prefill", "compressor_prefill"])
def test_bench_code_runs_at_tiny_shapes(op):
    """Each op's bench builds inputs, checks against its references and times, at a tiny shape (interpreter on CPU)."""
    from dsv4.kernels.compressor import bench as comp_bench
    from dsv4.kernels.indexer_topk import bench as idx_bench
    from dsv4.kernels.kv_format import bench as kv_bench
    from dsv4.kernels.sparse_decode import bench as dec_bench
    from dsv4.kernels.sparse_prefill import bench as pre_bench

    model = _tiny()
    if op == "kv_format":
        rows = kv_bench.bench(model, 2, 256)
    elif op == "sparse_decode":
        rows = dec_bench.bench(model, 2, 256)
    elif op == "indexer_topk":
        rows = idx_bench.bench(model, 2, 256)
    elif op == "compressor":
        rows = comp_bench.bench(model, 2, 256)
    elif op == "sparse_prefill":
        rows = pre_bench.bench(model, 256, s_len=8)
    else:
        rows = comp_bench.bench_prefill(model, 256, chunk=64)
    assert rows and all(r.us is not None and r.us > 0 for r in rows), [(r.op, r.note) for r in rows]


def test_sweeps_check_and_time_every_variant_at_tiny_shapes():
    """The --sweep variants (a launch config, then each split plan; FP4 indexer keys) are checked against the
    reference before they are timed: every one at a tiny shape gets a time, none an error note."""
    from dsv4.kernels.indexer_topk import bench as idx_bench
    from dsv4.kernels.sparse_decode import bench as dec_bench

    rows = dec_bench.sweep(_tiny(), 1, 256, "csa", configs=[(16, 16, 4, 1)])
    assert len(rows) == 1 + len(dec_bench.SWEEP_SPLITS) and any("split keys/max=64/16" in r.config for r in rows)
    rows += idx_bench.sweep(_tiny(), 1, 256, "fp4", configs=[(16, 1)])
    assert all(r.us is not None and r.us > 0 for r in rows), [(r.config, r.note) for r in rows]


def test_json_report_has_the_fields_the_docs_read():
    import json

    from dsv4.scripts.bench_kernels import json_report

    ceil = Ceilings(hbm_gbps=4000.0, bf16_tflops=800.0, device_name="test GPU")
    rows = [BenchRow("sparse_decode.csa", "V4-Flash B=128 ctx=8192", us=250.0, bytes=10**8, flops=10**10, ref_us=900.0),
            skipped("indexer_topk.fp8", "V4-Pro B=128 ctx=1048576", "does not fit")]
    meta = dict(date="2026-12-07 22:00", torch="t", triton="tr", commit="abc1234", command="python scripts/bench_kernels.py")
    out = json.loads(json.dumps(json_report(meta, ceil, rows)))
    assert (out["commit"], out["date"], out["gpu"]) == ("abc1234", "2026-12-07 22:00", "test GPU")
    first, second = out["rows"]
    assert first["op"] == "sparse_decode.csa" and first["config"] == "V4-Flash B=128 ctx=8192"
    assert (first["us"], first["gbps"], first["tflops"]) == (250.0, 400.0, 40.0)
    assert second["us"] is None and second["gbps"] is None and "does not fit" in second["note"]
