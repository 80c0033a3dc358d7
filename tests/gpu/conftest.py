"""GPU-only tests of the decode step: skipped without CUDA; run on the H200 (output in docs/bench/)."""

import pytest
import torch

if not torch.cuda.is_available():
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def gpu_models():
    """flash-mini (V4-Flash dimensions, 4 layers, 16 experts) with random weights made on the GPU:
    bf16 (the served dtype) and float32 (the reference), same values before the bf16 cast."""
    from dsv4.backend import presets
    from dsv4.backend.checkpoint.writer import randomize_weights
    from dsv4.backend.model.transformer import Transformer

    cfg = presets.preset("flash-mini")
    models = {}
    for dtype in (torch.bfloat16, torch.float32):
        with torch.device("cuda"):
            models[dtype] = randomize_weights(Transformer(cfg, dtype), seed=3).eval()
    return models
