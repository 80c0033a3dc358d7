"""Sparse prefill attention: causal sliding window of raw entries + selected/all compressed entries, sink, inverse RoPE."""

from .kernel import sparse_prefill, sparse_prefill_batch
from .reference import sparse_prefill_ref

__all__ = ["sparse_prefill", "sparse_prefill_batch", "sparse_prefill_ref"]
