"""Where a served request's time goes: dsv4-serve with Triton's TIMESTAMPS trace on, a few prompts."""
import json, os, sys, time
from pathlib import Path
from dsv4.backend.tokenizer import TextCodec
from dsv4.scripts.bench_serving import start_server, _stream_timings, text_prompt

model, out = Path(sys.argv[1]), Path(sys.argv[2])
trace = out / "trace.json"
codec = TextCodec.load(model)
extra = ["--max-model-len", "40000", "--max-batch", "8", "--max-sequences", "8",
         f"--triton-arg=--trace-config=triton,file={trace}", "--triton-arg=--trace-config=level=TIMESTAMPS",
         "--triton-arg=--trace-config=rate=1"]
serve, url, start_s = start_server(model, "cuda", Path("/tmp/trace_run"), extra)
print(f"start {start_s:.1f} s", flush=True)
for name, n in (("a", 16), ("b", 8192), ("c", 8192), ("d", 2048), ("e", 16), ("f", 32768), ("g", 512)):
    t0 = time.time()
    ttft, rate, tokens = _stream_timings(url, f"{name} " + text_prompt(codec, n), 4)
    print(f"{name} {n} tokens: TTFT {ttft*1e3:.1f} ms (sent at {t0:.3f})", flush=True)
serve.terminate(); serve.wait(120)
os.system(f"tail -c 3000 /tmp/trace_run/server/tritonserver.log > {out}/trace_server_tail.log")
