"""Quantized KV storage formats: FP8 main K=V entries, FP8/FP4 index keys, plane-layout pages."""

from .kernel import (
    dequantize_index_entries,
    dequantize_main_entries,
    quantize_index_entries,
    quantize_main_entries,
    read_index_entries,
    read_main_entries,
    write_index_entries,
    write_main_entries,
)
from .layout import IndexLayout, MainLayout, index_entry_bytes, main_entry_bytes
from .reference import hadamard_matrix

__all__ = [
    "IndexLayout",
    "MainLayout",
    "dequantize_index_entries",
    "dequantize_main_entries",
    "hadamard_matrix",
    "index_entry_bytes",
    "main_entry_bytes",
    "quantize_index_entries",
    "quantize_main_entries",
    "read_index_entries",
    "read_main_entries",
    "write_index_entries",
    "write_main_entries",
]
