"""Triton adapter for the prefill stage; the cache state leaves as tensors on the model's device."""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from dsv4.backend.generate import PrefillCancelled
from dsv4.backend.serving.request import RequestConfig
from dsv4.backend.serving.stages import PrefillStage, serving_limits
from dsv4.backend.serving.triton_io import (
    KV_METRICS, MetricSet, compute_dtype, error_response, instance_device, model_parameters, report_kv_usage,
)



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
        self.metrics = MetricSet(pb_utils, {
            "dsv4_prefix_cache_hits_total": ("counter", "Prompts that resumed from a cached prefix"),
            "dsv4_prefix_cache_misses_total": ("counter", "Prompts with a full block but no cached prefix"),
            "dsv4_prefix_cache_hit_tokens_total": ("counter", "Prompt tokens taken from the prefix cache"),
            "dsv4_prefill_prompt_tokens_total": ("counter", "Prompt tokens received by prefill"),
            "dsv4_prefill_computed_tokens_total": ("counter", "Prompt tokens prefill actually ran"),
            **KV_METRICS,
        })
        self.stage = PrefillStage(params["model_dir"], device, compute_dtype(params), limits.max_model_len,
                                  int(params["prefix_cache_bytes"]), snapshot_interval=int(params["snapshot_interval"]),
                                  kv_format=params["kv_format"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                raw = pb_utils.get_input_tensor_by_name(request, "request_config").as_numpy().reshape(-1)[0]
                token, header, payload = self.stage.run(ids, RequestConfig.from_json(raw), request.is_cancelled)
            except PrefillCancelled as exc:
                responses.append(error_response(pb_utils, "CANCELLED", f"prefill {exc}"))
                continue
            except Exception as exc:  # one failed prompt must not take the stage down
                responses.append(error_response(pb_utils, "INTERNAL", f"prefill failed: {exc}"))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("first_token", np.array([token], dtype=np.int32)),
                pb_utils.Tensor("kv_header", header.to_tensor().numpy()),
                _device_tensor("kv_state", payload),
            ]))
        self._report()
        return responses

    def _report(self):
        m, manager, stats = self.metrics, self.stage.cache.manager, self.stage.stats
        m.total("dsv4_prefix_cache_hits_total", manager.prefix_hits)
        m.total("dsv4_prefix_cache_misses_total", manager.prefix_misses)
        m.total("dsv4_prefix_cache_hit_tokens_total", manager.prefix_hit_tokens)
        m.total("dsv4_prefill_prompt_tokens_total", stats.prompt_tokens)
        m.total("dsv4_prefill_computed_tokens_total", stats.computed_tokens)
        report_kv_usage(m, "prefill", manager.usage())
