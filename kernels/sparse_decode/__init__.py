"""Sparse decode attention: window ring + selected/all compressed K=V entries, sink, inverse RoPE."""

from .kernel import sparse_decode
from .reference import sparse_decode_ref

__all__ = ["sparse_decode", "sparse_decode_ref"]
