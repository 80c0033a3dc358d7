"""Triton adapter: forwards decode's chunks; on a cancelled request, asks decode to stop that stream.
Counts what it has passed on, so decode's sender sends no faster than this step drains."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dsv4.backend.serving.response_pacing import ProgressCounter, counter_path, server_pid
from dsv4.backend.serving.triton_io import OUTPUT_NAMES

DECODE = "decode"


class TritonPythonModel:
    def initialize(self, args):
        self.cancelled = set()
        try:
            self.progress = ProgressCounter(counter_path(server_pid()))
        except OSError as exc:  # no /dev/shm: decode sends unpaced
            pb_utils.Logger.log_warn(f"stream_guard: no progress counter ({exc}); decode's responses are not paced")
            self.progress = None

    def execute(self, requests):
        responses = []
        for request in requests:
            ref = int(pb_utils.get_input_tensor_by_name(request, "stream_ref").as_numpy().reshape(-1)[0])
            if request.is_cancelled():
                self._cancel(ref)
            # never an error response: in Triton 2.51 a failed step leaves the ensemble request
            # in flight forever (it then blocks shutdown); the client is gone either way
            responses.append(pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(request, n) for n in OUTPUT_NAMES]))
        if self.progress is not None:
            self.progress.add(len(requests))
        return responses

    def finalize(self):
        if self.progress is not None:
            self.progress.close()

    def _cancel(self, ref):
        if ref in self.cancelled:
            return
        self.cancelled.add(ref)
        if len(self.cancelled) > 100_000:
            self.cancelled.clear()
        call = pb_utils.InferenceRequest(model_name=DECODE, requested_output_names=["finish_reason"],
                                         inputs=[pb_utils.Tensor("cancel_stream", np.array([ref], dtype=np.int64))])
        for _ in call.exec(decoupled=True):
            pass
