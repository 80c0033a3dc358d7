"""dsv4-serve: serve a DeepSeek-V4-architecture checkpoint from the real Triton Inference Server."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

from dsv4.scripts import server_metrics
from dsv4.scripts.openai_frontend import OpenAIFrontend
from dsv4.scripts.stage_gpus import PlacementError, StageGpus
from dsv4.scripts.triton_launcher import (
    COLOCATED_MODELS, SPLIT_MODELS, LaunchError, RunningServer, ServerOptions, TritonBundle, build_backend_dir,
    build_repository, port_free, start_server, wait_ready,
)

EPILOG = """examples:
  dsv4-serve                                   # the tiny model on 127.0.0.1:8000/8001/8002
  dsv4-serve --model /data/flash-mini --device cuda --dtype bf16
  dsv4-serve --host 0.0.0.0 --api-key $KEY     # listen beyond loopback (admin APIs need the key)
  dsv4-serve --openai-port 9000                # also the OpenAI API (dsv4-openai) on 127.0.0.1:9000

exit codes: 0 stopped by SIGTERM/SIGINT after draining, 1 the server did not start or did not
stop cleanly, 2 bad configuration (restarting will not help), 3 tritonserver died while serving.
"""

EXIT_STOPPED = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DIED = 3


def default_cache() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4-triton"))


def ensure_default_model(cache: Path) -> Path:
    """The `tiny` checkpoint, made on first use (seeded: every machine gets the same weights)."""
    path = cache / "tiny"
    if not (path / "config.json").is_file():
        from dsv4.backend.checkpoint.writer import write_checkpoint
        from dsv4.backend.presets import preset

        print(f"making the tiny checkpoint in {path} (first use)", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny-"))
        write_checkpoint(preset("tiny"), tmp, seed=0, progress=sys.stderr.isatty())
        tmp.rename(path)
    return path


def handoff_bytes(model_dir: Path, max_model_len: int, element_size: int) -> int:
    """Upper bound of one request's prefill -> decode state (sizes the shared memory / CUDA pool)."""
    from dsv4.backend.config import load_config

    cfg = load_config(model_dir)
    total = 0
    for layer in range(cfg.num_layers):
        total += cfg.window * cfg.head_dim
        rate = cfg.compress_rate(layer)
        if rate:
            entries = max_model_len // rate
            total += entries * cfg.head_dim + 6 * cfg.head_dim
            if cfg.layer_types[layer] == "compressed_sparse_attention":
                total += entries * cfg.index_head_dim + 6 * cfg.index_head_dim
    return total * max(element_size, 4)


def template_values(args, model_dir: Path) -> dict[str, str]:
    cuda = args.device == "cuda"
    colocated, gpus = args.stage_layout == "colocated", args.stage_gpus
    # colocated: decode's process holds both stages, so it gets the whole share and prefill's part
    # of it is a part of the KV budget; its torch threads serve both loops on a CPU
    decode_fraction = gpus.decode_fraction(args.gpu_memory_utilization, args.prefill_memory_share, colocated)
    decode_threads = max(args.decode_cpu_threads, args.prefill_cpu_threads) if colocated else args.decode_cpu_threads
    return {
        "model_dir": str(model_dir), "device": args.device, "dtype": args.dtype, "kv_format": args.kv_format,
        "instance_kind": "KIND_GPU" if cuda else "KIND_CPU", "force_cpu_inputs": "no" if cuda else "yes",
        "max_model_len": str(args.max_model_len), "max_tokens_limit": str(args.max_tokens_limit),
        "max_batch": str(args.max_batch), "max_sequences": str(args.max_sequences), "max_waiting": str(args.max_waiting),
        # 0 bytes: the stage sizes its pool from its share of the GPU, measured after its warm-up
        "kv_cache_bytes": str(int((args.kv_cache_gib or 0) * (1 << 30))),
        "prefix_cache_bytes": str(int((args.prefix_cache_gib or 0) * (1 << 30))),
        "decode_memory_fraction": f"{decode_fraction:.4f}",
        "prefill_memory_fraction": gpus.prefill_fractions(args.gpu_memory_utilization, args.prefill_memory_share),
        "decode_gpus": gpus.instance_gpus((gpus.decode,)) if cuda else "",
        "prefill_gpus": gpus.instance_gpus(gpus.prefill) if cuda else "",
        "snapshot_interval": str(args.snapshot_interval), "decode_cpu_threads": str(decode_threads),
        "prefill_cpu_threads": str(args.prefill_cpu_threads), "prefill_chunk": str(args.prefill_chunk),
        "prefill_token_budget": str(args.prefill_token_budget), "prefill_max_prompts": str(args.prefill_max_prompts),
        "tokenizer_instances": str(args.tokenizer_instances), "unary_instances": str(args.unary_instances),
        "cuda_graphs": "no" if args.no_cuda_graphs else "yes",
        "colocated_prefill": "yes" if colocated else "no", "prefill_kv_share": f"{args.prefill_memory_share:.4f}",
        "tensor_parallel": str(args.tensor_parallel), "expert_parallel": str(args.expert_parallel),
        "python": sys.executable,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsv4-serve", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the tiny model, made on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="compute dtype (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--kv-format", choices=["auto", "float", "fp8", "fp8-fp4"], default="auto",
                   help="KV pages: float (in --dtype), fp8 (584-byte entries, FP8 index keys), fp8-fp4 (FP4 index keys); "
                        "auto: fp8 on cuda, float on cpu")
    p.add_argument("--max-model-len", type=int, default=8192, help="longest prompt + output served (tokens)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-batch", type=int, default=64, help="decode batch size cap (rows of the decode step)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run the decode step eagerly instead of replaying CUDA graphs captured at start-up (debugging)")
    p.add_argument("--max-sequences", type=int, default=32, help="requests decode holds at once")
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued for KV room before UNAVAILABLE")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="decode's KV pool (requests reserve prompt + max_tokens); default 0.5 on cpu, on cuda what "
                        "decode's share of the GPU leaves after its warm-up")
    p.add_argument("--prefix-cache-gib", type=float, default=None,
                   help="prefill's pool (the running prompts plus cached prefixes); default 0.25 on cpu, on cuda what "
                        "prefill's share of the GPU leaves after its warm-up")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory prefill and decode may fill together: weights, warm-up peak "
                        "(activations, CUDA graphs) and the KV pools not given in GiB (default 0.9)")
    p.add_argument("--stage-layout", choices=["auto", "colocated", "split"], default="auto",
                   help="colocated: prefill runs in decode's process on the same weights, sharing the GPU's SMs "
                        "(decode's stream first); split: prefill is its own Triton model and process, handing the "
                        "cache state to decode through the ensemble. auto: colocated on cuda (two processes "
                        "time-slice one GPU), split on cpu (each stage gets its own threads)")
    p.add_argument("--decode-gpus", default=None, metavar="GPU",
                   help="the GPU decode runs on (default 0; cuda)")
    p.add_argument("--prefill-gpus", default=None, metavar="GPUS",
                   help="GPUs prefill runs on, one instance each, e.g. 0,1 (default: decode's; others than decode's "
                        "need --stage-layout split, which auto then picks; the state moves GPU to GPU)")
    p.add_argument("--prefill-memory-share", type=float, default=0.3,
                   help="prefill's part of that share, decode gets the rest (split); prefill's part of the measured "
                        "KV budget (colocated) (default 0.3)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="most tokens of one prompt per prefill step (default 8192 on cuda, 512 on cpu)")
    p.add_argument("--prefill-token-budget", type=int, default=None,
                   help="most prompt tokens per prefill step over all prompts run together (default 2x the chunk)")
    p.add_argument("--prefill-max-prompts", type=int, default=32,
                   help="most prompts prefilled together in one step (default 32; the token budget bounds the step)")
    p.add_argument("--snapshot-interval", type=int, default=None,
                   help="prefix-cache resume points every N 256-token blocks, besides each prompt's last block "
                        "(default: every prefill chunk, at least every 4 blocks)")
    from dsv4.backend.parallel.options import add_parallel_arguments

    add_parallel_arguments(p, "per stage, CPU and --stage-layout split: the stage's Triton instance starts the "
                              "others and they follow its calls")
    p.add_argument("--decode-cpu-threads", type=int, default=1, help="torch threads of the decode stage on --device cpu")
    p.add_argument("--prefill-cpu-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="torch threads of the prefill stage on --device cpu (default: all cores but one, left to decode)")
    p.add_argument("--tokenizer-instances", type=int, default=2)
    p.add_argument("--unary-instances", type=int, default=4)
    p.add_argument("--cuda-memory-pool-byte-size", type=int, default=None,
                   help="server CUDA pool for the prefill->decode handoff (default: sized for max-model-len with "
                        "--stage-layout split, 64 MiB colocated)")
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds in-flight requests get on shutdown")
    p.add_argument("--api-key", default=None, help="key for the model-repository and shared-memory APIs (required beyond loopback; generated if omitted)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--triton-arg", action="append", default=[], metavar="ARG",
                   help="one more tritonserver argument, e.g. --triton-arg=--trace-config=level=TIMESTAMPS (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="where the generated model repository and log go")
    p.add_argument("--openai-port", type=int, default=None, help="also serve the OpenAI API (dsv4-openai) on this port (default: off)")
    p.add_argument("--openai-api-key-file", type=Path, default=None,
                   help="keys the OpenAI API accepts, one per line (beyond loopback: generated and printed if omitted)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model name of the OpenAI API (repeatable; default dsv4)")
    return p.parse_args(argv)


def device_defaults(args) -> None:
    """Compute dtype and KV format left unset: bf16 + fp8 on cuda, fp32 + float pages on cpu; the
    stages' GPUs (`args.stage_gpus`) from --decode-gpus / --prefill-gpus."""
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.kv_format == "auto":
        args.kv_format = "fp8" if args.device == "cuda" else "float"
    try:
        args.stage_gpus = StageGpus.from_options(args.decode_gpus, args.prefill_gpus)
    except PlacementError as exc:
        raise LaunchError(str(exc)) from None
    if args.stage_layout == "auto":
        # prefill on GPUs of its own: its own process there (colocated would keep it on decode's GPU)
        args.stage_layout = "colocated" if args.device == "cuda" and not args.stage_gpus.disaggregated else "split"
    # a GPU prefill pass is launch-bound below a few thousand tokens; a CPU one is compute-bound
    args.prefill_chunk = args.prefill_chunk or (8192 if args.device == "cuda" else 512)
    # on a GPU the pools are measured (None); a CPU has no device share to measure
    if args.device == "cpu":
        args.kv_cache_gib = 0.5 if args.kv_cache_gib is None else args.kv_cache_gib
        args.prefix_cache_gib = 0.25 if args.prefix_cache_gib is None else args.prefix_cache_gib
    args.prefill_token_budget = args.prefill_token_budget or 2 * args.prefill_chunk
    # a resume point ends a chunk there: keep them on chunk boundaries so they cost no extra pass
    if args.snapshot_interval is None:
        from dsv4.backend.kv_cache.layout import BLOCK_TOKENS

        args.snapshot_interval = max(4, args.prefill_chunk // BLOCK_TOKENS)


def validate(args) -> Path:
    """Everything checkable before the server starts: checkpoint, config, device."""
    from dsv4.backend.checkpoint.loader import checkpoint_files
    from dsv4.backend.config import load_config

    model_dir = args.model.resolve() if args.model else ensure_default_model(default_cache())
    cfg = load_config(model_dir)
    checkpoint_files(model_dir)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LaunchError("--device cuda but no CUDA GPU is visible to this process")
    elif args.decode_gpus is not None or args.prefill_gpus is not None:
        raise LaunchError("--decode-gpus / --prefill-gpus place the stages on GPUs: they need --device cuda")
    device_defaults(args)
    _validate_gpus(args)
    if args.kv_format != "float" and cfg.head_dim - cfg.rope_dim < 64:
        raise LaunchError(f"--kv-format {args.kv_format} needs head_dim - rope_dim >= 64 (this model: {cfg.head_dim - cfg.rope_dim})")
    args.max_model_len = min(args.max_model_len, cfg.max_position_embeddings)
    for name in ("max_model_len", "max_tokens_limit", "max_batch", "max_sequences", "max_waiting", "tokenizer_instances",
                 "unary_instances", "prefill_chunk", "prefill_token_budget", "prefill_max_prompts"):
        if getattr(args, name) < 1:
            raise LaunchError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("kv_cache_gib", "prefix_cache_gib"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise LaunchError(f"--{name.replace('_', '-')} must be > 0 (leave it out on cuda to size it from GPU memory)")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise LaunchError(f"--gpu-memory-utilization must be in (0, 1], not {args.gpu_memory_utilization}")
    if not 0 < args.prefill_memory_share < 1:
        raise LaunchError(f"--prefill-memory-share must be in (0, 1), not {args.prefill_memory_share}")
    if args.prefill_token_budget < args.prefill_chunk:
        raise LaunchError(f"--prefill-token-budget ({args.prefill_token_budget}) must be >= --prefill-chunk ({args.prefill_chunk})")
    if args.openai_port is not None and not port_free(args.host, args.openai_port):
        raise LaunchError(f"OpenAI port {args.openai_port} on {args.host} is already in use; choose another with --openai-port")
    _validate_parallel(args, cfg)
    return model_dir


def _validate_gpus(args) -> None:
    if args.device != "cuda":
        return
    import torch

    try:
        args.stage_gpus.check(torch.cuda.device_count(), args.stage_layout == "colocated")
    except PlacementError as exc:
        raise LaunchError(str(exc)) from None


def _validate_parallel(args, cfg) -> None:
    from dsv4.backend.parallel.group import ParallelConfig, ParallelError

    try:
        parallel = ParallelConfig(args.tensor_parallel, args.expert_parallel)
        if not parallel.enabled:
            return
        parallel.check_model(cfg)
    except ParallelError as exc:
        raise LaunchError(str(exc)) from None
    if args.device != "cpu":  # the stage's ranks would need GPUs placed beside its instance's; not wired up
        raise LaunchError("dsv4-serve runs --tensor-parallel/--expert-parallel on CPU only for now "
                          "(dsv4-generate --device cuda runs them one GPU per rank)")
    if args.stage_layout != "split":
        raise LaunchError("--tensor-parallel/--expert-parallel need --stage-layout split (each stage's ranks follow "
                          "that stage's engine; colocated stages would share one model between two engines)")


def launch(args, model_dir: Path, work: Path, bundle: TritonBundle | None = None) -> RunningServer:
    """Build the repository for `args` and start tritonserver (not yet waited for)."""
    bundle = bundle or TritonBundle.locate()
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    work.mkdir(parents=True, exist_ok=True)
    handoff = handoff_bytes(model_dir, args.max_model_len, 2 if args.dtype == "bf16" else 4)
    # colocated: the state never crosses Triton, so its CUDA pool only carries small tensors
    pool = 4 * handoff if args.stage_layout == "split" else 64 << 20
    opts = ServerOptions(
        host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        exit_timeout_s=args.exit_timeout, shm_bytes=max(16 << 20, 2 * handoff),
        cuda_pool_bytes=(args.cuda_memory_pool_byte_size or pool) if args.device == "cuda" else 0,
        cuda_pool_gpus=args.stage_gpus.used,
        api_key=None if loopback else args.api_key, extra_args=tuple(args.triton_arg),
    )
    models = COLOCATED_MODELS if args.stage_layout == "colocated" else SPLIT_MODELS
    repo = build_repository(work / "models", template_values(args, model_dir), models, args.stage_layout)
    backends = build_backend_dir(work / "backends", bundle)
    return start_server(repo, backends, bundle, opts, work / "tritonserver.log")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model_dir = validate(args)
    except Exception as exc:
        print(f"dsv4-serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        args.api_key = secrets.token_urlsafe(24)
        print(f"dsv4-serve: listening beyond loopback; admin APIs need header dsv4-api-key: {args.api_key}", file=sys.stderr)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dsv4-serve-"))
    started = time.monotonic()
    try:
        server = launch(args, model_dir, work)
    except LaunchError as exc:
        print(f"dsv4-serve: {exc}", file=sys.stderr)
        _remove_workdir(args, work)
        return EXIT_FAILED
    stop_signal: dict[str, int] = {}
    signal.signal(signal.SIGINT, lambda signum, _frame: stop_signal.setdefault("sig", signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_signal.setdefault("sig", signum))
    try:
        waited = wait_ready(server, args.ready_timeout, stop_signal)
    except LaunchError as exc:
        server.stop(5)
        print(f"dsv4-serve: the server did not come up: {exc}\n(log: {work / 'tritonserver.log'})", file=sys.stderr)
        return EXIT_FAILED
    frontend = None
    if args.openai_port is not None and not stop_signal:
        try:
            frontend = OpenAIFrontend.start(args, server.grpc_url)
        except LaunchError as exc:
            server.stop()
            print(f"dsv4-serve: the OpenAI API did not come up: {exc}", file=sys.stderr)
            return EXIT_FAILED
    if not stop_signal:
        print(_banner(server, model_dir, waited, work), flush=True)
        if frontend is not None:
            print(f"  OpenAI   {frontend.url}/v1   (dsv4-openai: /v1/models, /v1/completions, /v1/chat/completions)\n",
                  flush=True)
    while server.alive() and (frontend is None or frontend.alive()) and not stop_signal:
        time.sleep(0.2)
    frontend_died = frontend is not None and not stop_signal and not frontend.alive()
    if not stop_signal and not frontend_died:
        code = server.proc.returncode
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        print(f"dsv4-serve: tritonserver died ({cause}) after {time.monotonic() - started:.0f}s; "
              f"its log: {work / 'tritonserver.log'}", file=sys.stderr, flush=True)
        if frontend is not None:
            frontend.stop(5)
        return EXIT_DIED
    if stop_signal:
        print("dsv4-serve: stopping: draining streams, then shutting the server down", file=sys.stderr, flush=True)
    stopping = time.monotonic()
    if frontend is not None:
        # no new OpenAI requests from here; the open ones end as decode drains them
        frontend.begin_stop()
    code = server.stop()
    if frontend is not None:
        frontend.stop(args.exit_timeout + 15)
        if frontend_died:
            print(f"dsv4-serve: dsv4-openai exited (code {frontend.proc.returncode}); server stopped", file=sys.stderr)
            return EXIT_FAILED
    clean = code == 0 or server.ended_held_by_streams
    print(f"dsv4-serve: {'drained and stopped' if clean else 'stopped, not cleanly,'} in {time.monotonic() - stopping:.1f}s "
          f"(tritonserver exit code {code}) after {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    if not clean:
        print(f"dsv4-serve: its log: {work / 'tritonserver.log'}", file=sys.stderr)
        return EXIT_FAILED
    _remove_workdir(args, work)
    return EXIT_STOPPED


def _remove_workdir(args, work: Path) -> None:
    """The generated repository and log live in a temporary folder unless --workdir chose one."""
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def client_command(bin_dir: Path | None = None, cwd: Path | None = None) -> str:
    """How to run dsv4-client from the user's shell: bare when PATH finds this one, else a path."""
    bin_dir = bin_dir or Path(sys.executable).parent
    cwd = cwd or Path.cwd()
    mine = bin_dir / "dsv4-client"
    found = shutil.which("dsv4-client")
    if found and Path(found).resolve() == mine.resolve():
        return "dsv4-client"
    try:
        return str(mine.relative_to(cwd))
    except ValueError:
        return str(mine)


def memory_split(metrics_url: str) -> str | None:
    """How each stage split its share of the GPU (its `dsv4_gpu_memory_bytes`); None when no stage
    sized its pool from GPU memory (CPU, or both pools given in GiB)."""
    try:
        samples = server_metrics.scrape(metrics_url)
    except (urllib.error.URLError, OSError):
        return None
    parts: dict[str, dict[str, float]] = {}
    for (name, labels), value in samples.items():
        if name == "dsv4_gpu_memory_bytes":
            label = dict(labels)
            parts.setdefault(label["stage"], {})[label["part"]] = value / 2**30
    def prefix(p: dict[str, float]) -> str:
        return f" (prefix cache {p['kv_prefix']:.1f})" if "kv_prefix" in p else ""

    return "; ".join(f"{stage} {p['share']:.1f} GiB = weights {p['weights']:.1f} + working {p['working']:.1f} + "
                     f"KV {p['kv']:.1f}{prefix(p)}" for stage, p in sorted(parts.items())) or None


def _banner(server, model_dir: Path, waited: float, work: Path) -> str:
    http, grpc = server.http_url, server.grpc_url
    split = memory_split(server.metrics_url)
    memory = f"\n  GPU      {split}" if split else ""
    return f"""
DeepSeek-V4 on Triton is ready ({waited:.1f}s): model {model_dir}
  HTTP     {http}        (generate: {http}/v2/models/dsv4/generate_stream)
  gRPC     {grpc}
  metrics  {server.metrics_url}
  log      {work / 'tritonserver.log'}
  limits   {server.stack.describe()}{memory}

try it:
  curl -s {http}/v2/models/dsv4/generate -H 'Content-Type: application/json' -d '{{"text_input": "Hello", "max_tokens": 16, "temperature": 0}}'
  {client_command()} --url {grpc} --prompt "Hello" --max-tokens 16 --stream
Ctrl-C stops the server gracefully.
"""


if __name__ == "__main__":
    sys.exit(main())
