"""Non-decoupled entry point for unary gRPC `infer()` and HTTP `/infer`: runs the dsv4 ensemble
through BLS without streaming and returns its single response.

Triton 2.51 reports every BLS error as INTERNAL, so requests are validated here first (bad input
must come back as INVALID_ARG) and the decode stage's capacity error is recognised by its text.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from dsv4.backend.serving.decode_engine import NO_ROOM_MESSAGE
from dsv4.backend.serving.request import RequestError
from dsv4.backend.serving.stages import TokenizerStage, serving_limits
from dsv4.backend.serving.triton_io import OUTPUT_NAMES, REQUEST_INPUTS, error_response, model_parameters, read_inputs, request_parameters

ENSEMBLE = "dsv4"


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        limits = serving_limits(params["model_dir"], int(params["max_model_len"]), int(params["max_tokens_limit"]))
        self.validator = TokenizerStage(params["model_dir"], limits)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            self.validator.process(read_inputs(pb_utils, request, REQUEST_INPUTS), request_parameters(request))
        except RequestError as exc:
            return error_response(pb_utils, "INVALID_ARG", str(exc))
        inputs = [pb_utils.get_input_tensor_by_name(request, n) for n in REQUEST_INPUTS if n != "stream"]
        inputs = [t for t in inputs if t is not None] + [pb_utils.Tensor("stream", np.array([False]))]
        call = pb_utils.InferenceRequest(model_name=ENSEMBLE, requested_output_names=list(OUTPUT_NAMES), inputs=inputs)
        result = None
        for response in call.exec(decoupled=True):
            if response.has_error():
                message = response.error().message()
                return error_response(pb_utils, "UNAVAILABLE" if NO_ROOM_MESSAGE in message else "INTERNAL", message)
            if response.output_tensors():
                result = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(n, pb_utils.get_output_tensor_by_name(response, n).as_numpy()) for n in OUTPUT_NAMES])
        return result or error_response(pb_utils, "INTERNAL", f"{ENSEMBLE} returned no response")
