"""Triton adapter for the tokenizer stage: tensors in, validation + encoding in `dsv4.backend`."""

import numpy as np
import triton_python_backend_utils as pb_utils

from dsv4.backend.serving.request import RequestError
from dsv4.backend.serving.stages import TokenizerStage, serving_limits
from dsv4.backend.serving.triton_io import REQUEST_INPUTS, error_response, model_parameters, read_inputs, request_parameters


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        limits = serving_limits(params["model_dir"], int(params["max_model_len"]), int(params["max_tokens_limit"]))
        self.stage = TokenizerStage(params["model_dir"], limits)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids, config = self.stage.process(read_inputs(pb_utils, request, REQUEST_INPUTS), request_parameters(request))
            except RequestError as exc:
                responses.append(error_response(pb_utils, "INVALID_ARG", str(exc)))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("input_ids", ids),
                pb_utils.Tensor("request_config", np.array([config], dtype=np.object_)),
            ]))
        return responses
