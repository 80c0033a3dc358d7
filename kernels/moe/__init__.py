"""MoE on the device: routing (hash or sqrt-softplus top-k), clamped SwiGLU, weighted combine.

The expert GEMMs themselves are `torch._grouped_mm` over tokens sorted by expert (see
`backend/model/moe.py`). `reference` is plain torch (the model's reference path); `kernel` needs triton.
"""
