#!/usr/bin/env bash
# One H200 call for the GPU decode work: the decode benchmark, the GPU tests and the real-shape kernel
# tests, each under its own time limit, logs and JSON under $OUT (or ./runs/h200 off the device tool).
#   scripts/h200_decode.sh [bench] [bench256] [tests] [kernels] [kbench] [ksweep] [ncu] [e2e] [tokenizer] [profile] [locust]
#   (default: bench tests kernels)
# Environment: STRICT=1 stops at the first failed phase; BENCH_BATCHES, GPU_TESTS, TESTS_S, E2E_S, E2E_ARGS, PROFILE_ARGS,
# KBENCH_ARGS, NCU_ARGS, KERNELS_S tune
# the phases (E2E_PY: the e2e phase's interpreter); DSV4_COMMIT names the commit in the results (the device copy has no git history).
# Needs .gpu (../shared/tools/gpu-bundle.sh) carried along; the locust phase also .gpu-locust (Locust's
# wheels for the device's Python: scripts/gpu_locust_wheels.sh). The transformers wheel may travel apart,
# in .gpu-hf, for the calls that compare against transformers (a call carries 64 MiB at most).
set -uo pipefail
cd "$(dirname "$0")/.."
source .gpu/activate
if compgen -G ".gpu-hf/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu-hf/*.whl
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-runs/h200}
mkdir -p "$out"
py=${PY_NUMPY2:-python3}
phases=${*:-bench tests kernels}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# at most 8 files come back from the device tool: every phase's stderr goes to one log
err="$out/stderr.log"
for phase in $phases; do
  start=$(date +%s)
  case $phase in
    bench)
      timeout 220 $py scripts/bench_decode.py --preset flash-mini --batches ${BENCH_BATCHES:-1,8,32,128} --contexts 8192 --steps 16 --kernel-table "$out/kernels_b1.txt" \
        --json "$out/decode_flash_mini.json" 2>>"$err" | tee "$out/bench.md" ;;
    bench256)
      timeout 300 $py scripts/bench_decode.py --preset flash-mini --experts 256 --batches 1,128 --contexts 8192 \
        --steps 16 --kernel-table "$out/kernels_256e_b1.txt" --json "$out/decode_256e.json" 2>>"$err" | tee "$out/bench256.md" ;;
    tests)
      timeout ${TESTS_S:-330} $py -m pytest ${GPU_TESTS:-tests/gpu} -q -s -p no:cacheprovider --timeout 300 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
    kernels)
      DSV4_REAL_SHAPES=1 timeout ${KERNELS_S:-300} $py -m pytest -q -x -p no:cacheprovider tests/kernels/test_sparse_decode.py \
        tests/kernels/test_sparse_prefill.py tests/kernels/test_indexer_topk.py tests/kernels/test_compressor.py \
        tests/kernels/test_sampling.py tests/kernels/test_mhc.py tests/kernels/test_norm_rope.py tests/kernels/test_moe.py \
        2>&1 | tee "$out/kernel_tests.log" | tail -15 ;;
    e2e)
      [[ -f /tmp/flash-mini/config.json ]] || timeout 120 $py -m dsv4.scripts.make_checkpoint flash-mini --out /tmp/flash-mini >>"$err" 2>&1
      # the served half starts dsv4-serve with this interpreter: the stubs need numpy < 2 (E2E_PY=python3),
      # the transformers half needs the device's own (numpy 2)
      timeout ${E2E_S:-540} ${E2E_PY:-$py} scripts/bench_e2e.py --model /tmp/flash-mini --json "$out/h200_e2e.json" ${E2E_ARGS:-} \
        2>>"$err" | tee "$out/e2e.md" ;;
    kbench)
      # every attention kernel at the issue's shapes, ceilings in the same run (docs/bench/h200_kernels.json)
      timeout ${KBENCH_S:-420} $py scripts/bench_kernels.py ${KBENCH_ARGS:-} --json "$out/kernels.json" \
        2>>"$err" | tee "$out/kernels.md" | tail -80 ;;
    ksweep)
      timeout ${KSWEEP_S:-300} $py scripts/bench_kernels.py --sweep --models flash --batches 1,128 --contexts 8192,1048576 \
        2>>"$err" | tee "$out/sweep.md" ;;
    ncu)
      # hardware counters per kernel (Firecracker machines): bandwidth, SM and tensor-pipe use, occupancy
      timeout ${NCU_S:-420} $py scripts/ncu_kernels.py ${NCU_ARGS:-} --json "$out/ncu.json" 2>>"$err" | tee "$out/ncu.md" ;;
    tokenizer)
      timeout 120 python3 scripts/bench_tokenizer.py --json "$out/tokenizer.json" 2>>"$err" | tee "$out/tokenizer.md" ;;
    profile)
      # colocated prefill beside decode, in-process: where slow decode steps and slow prefill passes lose time
      timeout ${PROFILE_S:-420} python3 scripts/profile_colocated.py ${PROFILE_ARGS:-} --json "$out/profile_colocated.json" \
        2>>"$err" | tee "$out/profile.md" ;;
    locust)
      # the served flash-mini under Locust's `mixed` scenario; the report's plots are drawn off the device
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-locust/*.whl 2>>"$err"
      [[ -f /tmp/flash-mini/config.json ]] || timeout 120 $py -m dsv4.scripts.make_checkpoint flash-mini --out /tmp/flash-mini >>"$err" 2>&1
      python3 -m dsv4.scripts.serve --model /tmp/flash-mini --device cuda --max-model-len 16384 --workdir /tmp/serve-locust \
        > "$out/locust_serve.log" 2>&1 &
      serve_pid=$!
      for _ in $(seq 300); do grep -q "is ready" "$out/locust_serve.log" && break; kill -0 $serve_pid 2>/dev/null || break; sleep 1; done
      timeout ${LOCUST_S:-200} python3 -m load_tests.run --scenario mixed --host grpc://127.0.0.1:8001 --users ${LOCUST_USERS:-32} \
        --duration ${LOCUST_DURATION:-120s} --out /tmp/locust-mixed --no-plots 2>>"$err" | tee "$out/locust.md"
      kill -TERM $serve_pid; wait $serve_pid
      cp /tmp/locust-mixed/raw-u*.jsonl /tmp/locust-mixed/locust-u*_stats.csv "$out/" 2>>"$err"
      tail -5 /tmp/serve-locust/tritonserver.log >>"$err" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  status=${PIPESTATUS[0]}
  echo "== $phase: $(( $(date +%s) - start )) s (exit $status)"
  # STRICT=1: a failed phase stops the run (no timing of code that just failed its checks)
  if [[ $status != 0 && ${STRICT:-0} == 1 ]]; then exit "$status"; fi
done
