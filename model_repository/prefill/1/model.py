"""Triton adapter for the prefill stage (decoupled); the cache state leaves as tensors on the model's device.

Threads: Triton calls `execute`, which only hands prompts to the engine loop (in `dsv4.backend`),
which prefills those waiting together; this file's sender thread does the IPC of the answers
(one response per request, then FINAL) and the metrics.
"""

import itertools
import os
import queue
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from dsv4.backend.parallel.followers import stage_parallel, start_followers
from dsv4.backend.parallel.replica import ReplicatedStage
from dsv4.backend.parallel.stage_worker import StageSpec
from dsv4.backend.serving import gpu_memory
from dsv4.backend.serving.prefill_engine import PrefillEngine, PrefillSettings
from dsv4.backend.serving.prefill_metrics import PREFILL_BUCKETS, PREFILL_METRICS, report_prefill
from dsv4.backend.serving.prefill_stage import PrefillStage
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.serving.stages import serving_limits
from dsv4.backend.serving.triton_io import (
    KV_METRICS, MetricSet, compute_dtype, error_response, instance_device, memory_fraction, model_parameters,
    report_memory_split, watch_parent,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_S = 0.1


def _device_tensor(name, t):
    if t.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t.contiguous()))
    return pb_utils.Tensor(name, t.numpy())


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        device = instance_device(args, params)
        if device == "cpu":
            torch.set_num_threads(int(params["cpu_threads"]))
        limits = serving_limits(params["model_dir"], int(params["max_model_len"]), 1)
        self.metrics = MetricSet(pb_utils, {**PREFILL_METRICS, **KV_METRICS}, PREFILL_BUCKETS)
        max_prompts = int(params["max_prompts"])
        cache_bytes = int(params["prefix_cache_bytes"])  # 0: what the GPU share leaves after the warm-up
        stage = PrefillStage(params["model_dir"], device, compute_dtype(params), limits.max_model_len,
                             cache_bytes or None, snapshot_interval=int(params["snapshot_interval"]),
                             kv_format=params["kv_format"], max_prompts=max_prompts)
        settings = PrefillSettings(chunk=int(params["chunk"]), token_budget=int(params["token_budget"]),
                                   max_prompts=max_prompts)
        if device != "cpu":  # compile and autotune before "ready", not on the first request
            weights = gpu_memory.start_measuring(stage.model.device)
            seconds = stage.warm_up(settings.chunk, settings.widest_pass)
            pb_utils.Logger.log_info(f"prefill: kernels warmed up in {seconds:.1f} s")
            if not cache_bytes:
                split = gpu_memory.split_after_warm_up("prefill", stage.model.device, memory_fraction(params, device),
                                                       weights)
                stage.allocate(split.kv_bytes)
                report_memory_split(self.metrics, split)
                pb_utils.Logger.log_info(split.describe())
        self.followers = None
        parallel = stage_parallel(params)
        if parallel.enabled:  # this process is rank 0; the others replay its stage's calls
            spec = StageSpec("prefill", params["model_dir"], params["dtype"], params["kv_format"], limits.max_model_len,
                             cache_bytes, parallel.tensor_parallel, parallel.expert_parallel, int(params["cpu_threads"]),
                             snapshot_interval=int(params["snapshot_interval"]), max_prompts=max_prompts)
            self.followers = start_followers(spec, params["python"], stage.model)
            stage = ReplicatedStage(stage, self.followers.leader)
        self.engine = PrefillEngine(stage, settings, self._sink)
        self.outbox = queue.Queue()
        self.senders = {}
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.sender = threading.Thread(target=self._send_loop, name="dsv4-prefill-sender", daemon=True)
        self.engine.start()
        self.sender.start()
        self.watchdog = watch_parent(os.getppid(), os.getpid())

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().copy()
                raw = pb_utils.get_input_tensor_by_name(request, "request_config").as_numpy().reshape(-1)[0]
                config = RequestConfig.from_json(raw)
            except Exception as exc:
                sender.send(error_response(pb_utils, "INTERNAL", f"prefill could not read its inputs: {exc}"), flags=FINAL)
                continue
            if self.followers is not None and self.followers.failure:
                sender.send(error_response(pb_utils, "UNAVAILABLE", f"prefill cannot run: {self.followers.failure}"),
                            flags=FINAL)
                continue
            rid = next(self.ids)
            self.senders[rid] = (sender, raw)
            self.engine.submit(rid, ids, config, sender.is_cancelled)
        return None

    def _sink(self, rid, result, error):
        self.outbox.put((rid, result, error))

    def _send_loop(self):
        while not (self.stopping.is_set() and self.outbox.empty()):
            try:
                rid, result, error = self.outbox.get(timeout=POLL_S)
                self._send(rid, result, error)
            except queue.Empty:
                pass
            self._report()

    def _send(self, rid, result, error):
        sender, raw_config = self.senders.pop(rid, (None, None))
        if sender is None:
            return
        if error is not None:
            response = error_response(pb_utils, *error)
        else:
            response = pb_utils.InferenceResponse([
                pb_utils.Tensor("first_token", np.array([result.first_token], dtype=np.int32)),
                pb_utils.Tensor("kv_header", result.header.to_tensor().numpy()),
                _device_tensor("kv_state", result.payload),
                pb_utils.Tensor("request_config_out", np.array([raw_config], dtype=np.object_)),
            ])
        try:
            sender.send(response, flags=FINAL)
        except Exception as exc:  # the client is gone; nothing holds blocks any more
            pb_utils.Logger.log_warn(f"prefill: could not answer request {rid}: {exc}")

    def _report(self):
        if self.stopping.is_set():
            return
        report_prefill(self.metrics, self.engine)

    def finalize(self):
        self.engine.stop()
        if self.followers is not None:
            self.followers.stop()
        self.stopping.set()
        self.sender.join(timeout=10)
        self.watchdog.terminate()
