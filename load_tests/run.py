"""Run a scenario headless at one or more concurrency levels, then write the report.

    python -m load_tests.run --scenario short_chat --host grpc://127.0.0.1:8001 --users 1,4,8 \\
        --duration 20s --out runs/short_chat

For each level it runs ``locust -f load_tests/locustfile.py --headless -u N -r R -t DURATION``
with raw samples in ``OUT/raw-uN.jsonl`` and Locust's CSVs as ``OUT/locust-uN_*.csv``, then
``load_tests.report`` over all levels into ``OUT/report/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.report import print_table, write_report  # noqa: E402
from load_tests.scenario import list_scenarios  # noqa: E402

__all__ = ["locust_command", "main"]


def locust_command(*, host: str, scenario: str, users: int, spawn_rate: float, duration: str, raw_out: Path,
                   csv_prefix: Path, run_id: str, model: str, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(users), "-r", str(spawn_rate), "-t", duration, "--host", host,
        "--scenario", scenario, "--raw-out", str(raw_out), "--run-id", run_id, "--model", model,
        "--csv", str(csv_prefix), "--exit-code-on-error", "0", *extra,
    ]


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--users wants numbers like 1,4,8: {text!r}") from e
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--users wants positive numbers")
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", required=True, help=f"one of {', '.join(list_scenarios())} or a JSON path")
    parser.add_argument("--host", required=True, help="grpc://host:port or http://host:port")
    parser.add_argument("--users", type=_levels, default=[1], help="concurrency levels, e.g. 1,4,8 (default 1)")
    parser.add_argument("--spawn-rate", type=float, default=0.0, help="users started per second (default: all at once)")
    parser.add_argument("--duration", default="20s", help="run time per level, Locust syntax (default 20s)")
    parser.add_argument("--warmup-s", type=float, default=0.0, help="drop requests sent in the first N s of each level")
    parser.add_argument("--model", default="dsv4")
    parser.add_argument("--out", default=None, help="output directory (default runs/<scenario>-<time>)")
    parser.add_argument("--locust-arg", action="append", default=[], help="extra argument passed to locust")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG plots (no matplotlib here: run load_tests.report on the raw files elsewhere)")
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "runs" / f"{Path(args.scenario).stem}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    raw_files = []
    for users in args.users:
        raw = out / f"raw-u{users}.jsonl"
        raw.unlink(missing_ok=True)
        cmd = locust_command(host=args.host, scenario=args.scenario, users=users,
                             spawn_rate=args.spawn_rate or users, duration=args.duration, raw_out=raw,
                             csv_prefix=out / f"locust-u{users}", run_id=f"u{users}", model=args.model,
                             extra=args.locust_arg)
        print(f"== {users} users: {' '.join(cmd[2:])}", flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        if rc != 0:
            print(f"locust exited with {rc}", file=sys.stderr)
        if raw.exists():
            raw_files.append(raw)
    if not raw_files:
        print("no samples were recorded", file=sys.stderr)
        return 1
    summary = write_report(raw_files, out / "report", warmup_s=args.warmup_s, plots=not args.no_plots)
    print_table(summary, sys.stdout)
    print(f"report: {out / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
