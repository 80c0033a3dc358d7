"""Triton adapter for the decode stage (decoupled).

Threads: Triton calls `execute`, which only hands requests to the engine; the engine loop
(in `dsv4.backend`) batches every active request; this file's sender thread does the slow
IPC (`send`, `is_cancelled`, metrics), so the engine never waits on a client.
"""

import itertools
import queue
import threading
import time

import torch
import triton_python_backend_utils as pb_utils

from dsv4.backend.checkpoint.loader import load_model
from dsv4.backend.kv_cache.allocator import pool_sizes_for
from dsv4.backend.kv_cache.storage import KVStorage
from dsv4.backend.serving.decode_engine import Arrival, DecodeEngine
from dsv4.backend.serving.handoff import StateHeader
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.serving.triton_io import chunk_tensors, error_response, model_parameters
from dsv4.backend.tokenizer import TextCodec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_S = 0.1


def _input_torch(request, name, device):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy().copy()).to(device)
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(device).clone()


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        device = params["device"]
        if device == "cuda":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        dtype = DTYPES[params["dtype"]]
        self.device = torch.device(device)
        model = load_model(params["model_dir"], dtype=dtype, device=device, progress=False)
        max_len = min(int(params["max_model_len"]), model.cfg.max_position_embeddings)
        storage = KVStorage(model.cfg, pool_sizes_for(int(params["max_sequences"]), max_len), dtype, device)
        self.engine = DecodeEngine(model, storage, TextCodec.load(params["model_dir"]), self._sink, int(params["max_batch"]))
        self.outbox = queue.Queue()
        self.clients = {}
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self._init_metrics()
        self.sender = threading.Thread(target=self._send_loop, name="dsv4-decode-sender", daemon=True)
        self.engine.start()
        self.sender.start()

    def _init_metrics(self):
        try:
            active = pb_utils.MetricFamily("dsv4_decode_active_requests", "Requests holding decode state", pb_utils.MetricFamily.GAUGE)
            steps = pb_utils.MetricFamily("dsv4_decode_steps_total", "Batched decode steps run", pb_utils.MetricFamily.COUNTER)
            self.metrics = {"active": active.Metric(labels={}), "steps": steps.Metric(labels={})}
            self._families = (active, steps)
        except Exception:  # metrics disabled on the server
            self.metrics = None
        self._steps_reported = 0

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
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

    def _sink(self, rid, chunk, error):
        self.outbox.put((rid, chunk, error))

    def _send_loop(self):
        last_poll = 0.0
        while not (self.stopping.is_set() and self.outbox.empty()):
            try:
                rid, chunk, error = self.outbox.get(timeout=POLL_S)
                self._send(rid, chunk, error)
            except queue.Empty:
                pass
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
            response = pb_utils.InferenceResponse(chunk_tensors(pb_utils, chunk))
        try:
            sender.send(response, flags=FINAL if final else 0)
        except Exception:  # the client is gone; stop generating for it
            self.engine.cancel(rid)
            final = True
        if final:
            self.clients.pop(rid, None)
        elif sender.is_cancelled():
            self.engine.cancel(rid)

    def _poll_cancellations(self):
        # streams are checked after each send; non-streamed requests only here
        for rid, (sender, stream) in list(self.clients.items()):
            if not stream and sender.is_cancelled():
                self.engine.cancel(rid)

    def _report(self):
        if self.metrics is None:
            return
        stats = self.engine.stats
        self.metrics["active"].set(self.engine.held_requests())
        self.metrics["steps"].increment(stats.steps - self._steps_reported)
        self._steps_reported = stats.steps

    def finalize(self):
        self.engine.stop()
        self.stopping.set()
        self.sender.join(timeout=10)
