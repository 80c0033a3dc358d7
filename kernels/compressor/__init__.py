"""Compressor: softmax pooling with running accumulators + RMSNorm + RoPE + quantize + cache insert."""

from .kernel import PrefillSpans, compressor_decode, compressor_prefill, compressor_prefill_batch
from .reference import compressor_decode_ref, compressor_prefill_ref, windowed_softmax_pool_ref

__all__ = ["PrefillSpans", "compressor_decode", "compressor_prefill_batch", "compressor_decode_ref", "compressor_prefill", "compressor_prefill_ref", "windowed_softmax_pool_ref"]
