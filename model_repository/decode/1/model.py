"""Triton adapter for the decode stage (decoupled).

Threads: Triton calls `execute`, which only hands requests to the engine; the engine loop
(in `dsv4.backend`) batches every active request; this file's sender thread does the slow
IPC (`send`, `is_cancelled`, metrics), so the engine never waits on a client.

With `colocated_prefill` the prefill engine runs here too, on the same weights and GPU
(`backend/serving/colocated.py`): requests come from the tokenizer with `input_ids`, not from a
prefill model with a cache state.
"""

import functools
import itertools
import os
import queue
import random
import threading
import time

import torch
import triton_python_backend_utils as pb_utils

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.paged_cache import PagedCache
from dsv4.backend.parallel.followers import stage_parallel, start_followers
from dsv4.backend.parallel.replica import ReplicatedDecodeEngine
from dsv4.backend.parallel.stage_worker import StageSpec
from dsv4.backend.serving.colocated import Colocated, measure_memory
from dsv4.backend.serving.decode_engine import Arrival, DecodeEngine, measure_decode_memory
from dsv4.backend.serving.handoff import StateHeader
from dsv4.backend.serving.prefill_engine import PrefillSettings
from dsv4.backend.serving.prefill_metrics import PREFILL_BUCKETS, PREFILL_METRICS, report_prefill
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.serving.response_pacing import Pacer, counter_path, counter_reader, server_pid
from dsv4.backend.serving.streams import stage_streams
from dsv4.backend.serving.text_state import coalesce
from dsv4.backend.serving.triton_io import (
    KV_METRICS, MetricSet, chunk_tensors, compute_dtype, error_response, instance_device, memory_fraction,
    model_parameters, report_kv_usage, report_memory_split, watch_parent,
)
from dsv4.backend.tokenizer import TextCodec

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_S = 0.1
PACED_POLL_S = 0.0005  # chunks are held for stream_guard: look again this soon
BUCKETS = {
    "vllm:time_to_first_token_seconds": [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0],
    "vllm:time_per_output_token_seconds": [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5],
    "vllm:e2e_request_latency_seconds": [1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0],
}


def _input_torch(request, name, device):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy().copy()).to(device)
    shared = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    # Triton's buffer: copy it out (from prefill's GPU, when that is another one: a device-to-device copy)
    return shared.clone() if shared.device == torch.device(device) else shared.to(device)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        device = instance_device(args, params)
        dtype = compute_dtype(params)
        if device == "cpu":
            # one thread: a tiny decode step is overhead-bound, and the other core is left for the
            # stages and IPC that carry tokens out and cancellations in
            torch.set_num_threads(int(params["cpu_threads"]))
        self.device = torch.device(device)
        model = load_model(params["model_dir"], dtype=dtype, device=device, progress=False)
        max_len = min(int(params["max_model_len"]), model.cfg.max_position_embeddings)
        cuda_graphs = params.get("cuda_graphs", "yes") == "yes"
        colocated = params["colocated_prefill"] == "yes"  # prefill runs here too, on the same weights
        self._init_metrics(colocated)
        kv_bytes = int(params["kv_cache_bytes"])  # 0: what the GPU share leaves after the warm-up
        streams = stage_streams(self.device)
        stage = settings = None
        if colocated:
            stage, settings, kv_bytes = self._init_prefill(params, model, max_len, kv_bytes, cuda_graphs)
        elif not kv_bytes:
            split = measure_decode_memory(model, params["kv_format"], int(params["max_batch"]), max_len,
                                          memory_fraction(params, str(self.device)), cuda_graphs)
            kv_bytes = split.kv_bytes
            report_memory_split(self.metrics, split)
            pb_utils.Logger.log_info(split.describe())
        cache = PagedCache.from_budget(model.cfg, dtype, device, kv_bytes, max_len,
                                       max_num_seqs=int(params["max_sequences"]), kv_format=params["kv_format"])
        engine_class, self.followers = DecodeEngine, None
        parallel = stage_parallel(params)
        if parallel.enabled:  # this process is rank 0; the others replay its engine's state changes
            spec = StageSpec("decode", params["model_dir"], params["dtype"], params["kv_format"], max_len, kv_bytes,
                             parallel.tensor_parallel, parallel.expert_parallel, int(params["cpu_threads"]),
                             max_batch=int(params["max_batch"]), max_sequences=int(params["max_sequences"]))
            self.followers = start_followers(spec, params["python"], model)
            engine_class = functools.partial(ReplicatedDecodeEngine, leader=self.followers.leader)
        self.engine = engine_class(model, cache, TextCodec.load(params["model_dir"]), self._sink,
                                   int(params["max_batch"]), int(params["max_waiting"]), max_model_len=max_len,
                                   cuda_graphs=cuda_graphs, stream=streams.decode)
        self.colocated = None if stage is None else Colocated(stage, settings, self.engine, self._sink, streams.prefill)
        self.outbox = queue.Queue()
        self.clients = {}
        # stream refs are unique across restarts too: stream_guard remembers cancelled ones
        self.ids = itertools.count(random.getrandbits(48) << 8)
        self.stopping = threading.Event()
        self._reported = None
        self.responses = 0
        self.pacer = Pacer(counter_reader(counter_path(server_pid())))
        self.sender = threading.Thread(target=self._send_loop, name="dsv4-decode-sender", daemon=True)
        seconds = (self.colocated or self.engine).start()
        if seconds:
            pb_utils.Logger.log_info(f"decode: CUDA graphs captured in {seconds:.1f} s")
        self.sender.start()
        self.watchdog = watch_parent(os.getppid(), os.getpid())

    def _init_metrics(self, with_prefill):
        spec = {  # vllm_backend's names where the meaning is the same
            "vllm:prompt_tokens_total": ("counter", "Prompt tokens of requests admitted to decode"),
            "vllm:generation_tokens_total": ("counter", "Tokens generated by finished requests"),
            "vllm:num_requests_running": ("gauge", "Requests in the decode batch"),
            "vllm:num_requests_waiting": ("gauge", "Requests waiting for KV-cache room"),
            "vllm:time_to_first_token_seconds": ("histogram", "Arrival at the tokenizer to the first token"),
            "vllm:time_per_output_token_seconds": ("histogram", "Mean time between a request's tokens"),
            "vllm:e2e_request_latency_seconds": ("histogram", "Arrival to the last token"),
            "dsv4_decode_steps_total": ("counter", "Batched decode steps run"),
            "dsv4_decode_responses_total": ("counter", "Responses sent (a stream's tokens queued behind the sender go out as one)"),
            **KV_METRICS,
            **(PREFILL_METRICS if with_prefill else {}),
        }
        self.metrics = MetricSet(pb_utils, spec, {**BUCKETS, **PREFILL_BUCKETS})

    def _init_prefill(self, params, model, max_len, kv_bytes, cuda_graphs):
        """The prefill engine's stage on decode's weights; returns it, its settings and decode's KV bytes.
        On a GPU both stages are warmed up before "ready" and, unless both pools are given in bytes,
        share the measured KV budget (`--prefill-memory-share` of it for prefill's pool)."""
        prefix_bytes = int(params["prefix_cache_bytes"])
        max_prompts = int(params["prefill_max_prompts"])
        stage = PrefillStage(params["model_dir"], str(self.device), model.dtype, max_len, prefix_bytes or None,
                             snapshot_interval=int(params["snapshot_interval"]), kv_format=params["kv_format"],
                             max_prompts=max_prompts, model=model)
        settings = PrefillSettings(chunk=int(params["prefill_chunk"]), token_budget=int(params["prefill_token_budget"]),
                                   max_prompts=max_prompts)
        if self.device.type != "cuda":
            return stage, settings, kv_bytes
        if prefix_bytes and kv_bytes:
            seconds = stage.warm_up(settings.chunk, settings.widest_pass)
            pb_utils.Logger.log_info(f"prefill: kernels warmed up in {seconds:.1f} s")
            return stage, settings, kv_bytes
        split = measure_memory(stage, settings, params["kv_format"], int(params["max_batch"]), max_len,
                               memory_fraction(params, str(self.device)), float(params["prefill_kv_share"]), cuda_graphs)
        report_memory_split(self.metrics, split)
        pb_utils.Logger.log_info(split.describe())
        prefix_bytes = prefix_bytes or split.prefix_kv_bytes
        stage.allocate(prefix_bytes)
        return stage, settings, kv_bytes or split.kv_bytes - prefix_bytes

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            cancel = pb_utils.get_input_tensor_by_name(request, "cancel_stream")
            if cancel is not None:  # stream_guard saw the client cancel this stream
                self._cancel(int(cancel.as_numpy().reshape(-1)[0]))
                sender.send(flags=FINAL)
                continue
            control = pb_utils.get_input_tensor_by_name(request, "control")
            if control is not None:
                self._control(control.as_numpy().reshape(-1)[0].decode(), sender)
                continue
            if self.followers is not None and self.followers.failure:
                sender.send(error_response(pb_utils, "UNAVAILABLE", f"decode cannot run: {self.followers.failure}"),
                            flags=FINAL)
                continue
            if pb_utils.get_input_tensor_by_name(request, "input_ids") is not None:
                self._prompt(request, sender)
                continue
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "request_config").as_numpy().reshape(-1)[0]
                config = RequestConfig.from_json(raw)
                first = int(pb_utils.get_input_tensor_by_name(request, "first_token").as_numpy().reshape(-1)[0])
                header = StateHeader.from_tensor(torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "kv_header").as_numpy()))
                payload = _input_torch(request, "kv_state", self.device)
            except Exception as exc:
                sender.send(error_response(pb_utils, "INTERNAL", f"decode could not read its inputs: {exc}"), flags=FINAL)
                continue
            rid = next(self.ids)
            self.clients[rid] = (sender, config.stream)
            self.engine.submit(Arrival(rid, config, first, header, payload))
        return None

    def _prompt(self, request, sender):
        """A prompt straight from the tokenizer (prefill in this process)."""
        if self.colocated is None:
            sender.send(error_response(pb_utils, "INTERNAL", "decode got a prompt but runs no prefill engine "
                                       "(the repository's ensemble and decode's colocated_prefill disagree)"), flags=FINAL)
            return
        try:
            ids = _input_torch(request, "input_ids", torch.device("cpu")).numpy()
            raw = pb_utils.get_input_tensor_by_name(request, "request_config").as_numpy().reshape(-1)[0]
            config = RequestConfig.from_json(raw)
        except Exception as exc:
            sender.send(error_response(pb_utils, "INTERNAL", f"decode could not read its inputs: {exc}"), flags=FINAL)
            return
        rid = next(self.ids)
        self.clients[rid] = (sender, config.stream)
        self.colocated.submit(rid, ids, config)

    def _cancel(self, rid):
        (self.colocated or self.engine).cancel(rid)

    def _control(self, command, sender):
        """`drain:<seconds>`: stop admitting, finish or cut active streams; answer once drained."""
        verb, _, arg = command.partition(":")
        if verb != "drain":
            sender.send(error_response(pb_utils, "INVALID_ARG", f"control: unknown command {command!r}"), flags=FINAL)
            return
        done = self.engine.drain(float(arg or 0))

        def answer():
            done.wait()
            sender.send(flags=FINAL)

        threading.Thread(target=answer, name="dsv4-drain", daemon=True).start()

    def _sink(self, rid, chunk, error):
        self.outbox.put((rid, chunk, error))

    def _send_loop(self):
        last_poll = 0.0
        held = []  # chunks waiting for stream_guard to take more
        while not (self.stopping.is_set() and self.outbox.empty() and not held):
            try:
                items = held + [self.outbox.get(timeout=PACED_POLL_S if held else POLL_S)]
            except queue.Empty:
                items = held
            while True:  # whatever queued meanwhile goes out as one response per request
                try:
                    items.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            items = coalesce(items)
            room = None if self.stopping.is_set() else self.pacer.room()
            held = []
            for rid, chunk, error in items:
                if error is None and room is not None:  # errors end the ensemble request: stream_guard never sees them
                    if room <= 0:
                        held.append((rid, chunk, error))
                        continue
                    room -= 1
                self._send(rid, chunk, error)
            now = time.monotonic()
            if now - last_poll >= POLL_S:
                last_poll = now
                self._poll_cancellations()
                self._report()

    def _send(self, rid, chunk, error):
        sender, _ = self.clients.get(rid, (None, False))
        if sender is None:
            return
        final = error is not None or chunk.final
        if error is not None:
            response = error_response(pb_utils, *error)
        else:
            response = pb_utils.InferenceResponse(chunk_tensors(pb_utils, chunk, rid))
        try:
            sender.send(response, flags=FINAL if final else 0)
            if error is None:
                self.pacer.record(1)
        except Exception:  # the client is gone; stop generating for it
            self._cancel(rid)
            final = True
        self.responses += 1
        if final:
            self.clients.pop(rid, None)

    def _poll_cancellations(self):
        # every POLL_S, not after each send: each check is an IPC round trip, and a stream behind
        # the ensemble is cancelled through stream_guard anyway
        for rid, (sender, _) in list(self.clients.items()):
            if sender.is_cancelled():
                self._cancel(rid)

    def _report(self):
        if self.stopping.is_set():
            return
        engine, m = self.engine, self.metrics
        # every update is an IPC round trip: only when something moved. The key is read before the
        # values, so a change the engine makes while they are read moves the key for the next poll
        # (a finish landing between two reads must not leave the gauges stale for good).
        prefill = self.colocated.prefill if self.colocated else None
        key = (self.responses, engine.stats.steps, engine.stats.finished, engine.stats.cancelled, engine.held_requests(),
               engine.waiting_requests(), prefill and (prefill.stage.stats.steps, prefill.held_requests()))
        if key == self._reported and not engine.timings:
            return
        self._reported = key
        if prefill is not None:
            report_prefill(m, prefill)
        m.total("vllm:prompt_tokens_total", engine.stats.prompt_tokens)
        m.total("vllm:generation_tokens_total", engine.stats.generation_tokens)
        m.total("dsv4_decode_steps_total", engine.stats.steps)
        m.total("dsv4_decode_responses_total", self.responses)
        m.set("vllm:num_requests_running", engine.held_requests())
        m.set("vllm:num_requests_waiting", engine.waiting_requests())
        report_kv_usage(m, "decode", engine.cache.manager.usage())
        while engine.timings:
            timing = engine.timings.popleft()
            m.observe("vllm:time_to_first_token_seconds", timing.ttft_s)
            m.observe("vllm:e2e_request_latency_seconds", timing.e2e_s)
            if timing.tpot_s is not None:
                m.observe("vllm:time_per_output_token_seconds", timing.tpot_s)

    def finalize(self):
        self.stopping.set()
        (self.colocated or self.engine).stop()
        if self.followers is not None:
            self.followers.stop()
        self.sender.join(timeout=10)
        self.watchdog.terminate()
