"""One layer's page pool of one cache kind, in a float or a packed (FP8 / FP4) storage format.

Float pools are `[blocks, E, dim]` tensors. Packed pools are `[blocks, E * entry_bytes]` uint8
pages in the plane layout of `dsv4.kernels.kv_format` (main entries: 448 e4m3 + 64 bf16 RoPE +
scales = 584 B at V4 shapes; index keys: 132 B FP8 or 68 B FP4). Writes quantize, reads
dequantize; on CUDA through the Triton kernels, elsewhere through their float32 references.
FP4 index keys are rotated by a normalised Hadamard matrix first (queries must be rotated the
same way; scores are unchanged, quantization error is spread over the dims).
"""

from __future__ import annotations

import torch

FLOAT = "float"
PACKED_FORMATS = ("main_fp8", "index_fp8", "index_fp4")


class PagedPool:
    def __init__(self, blocks: int, entries: int, dim: int, fmt: str, dtype: torch.dtype, device: torch.device,
                 rope_dim: int = 0):
        if fmt != FLOAT and fmt not in PACKED_FORMATS:
            raise ValueError(f"unknown pool format {fmt!r}; expected 'float' or one of {PACKED_FORMATS}")
        self.entries, self.dim, self.fmt, self.dtype, self.rope_dim = entries, dim, fmt, dtype, rope_dim
        self.rotation = None
        if fmt == FLOAT:
            shape, store = (blocks, entries, dim), dtype
        else:
            # packed formats live with the kernels (which need triton): imported only when used
            from dsv4.kernels.kv_format import reference
            from dsv4.kernels.kv_format.layout import index_entry_bytes, main_entry_bytes

            self._ref = reference
            entry = main_entry_bytes(dim, rope_dim) if fmt == "main_fp8" else index_entry_bytes(dim, fmt[len("index_"):])
            shape, store = (blocks, entries * entry), torch.uint8
            if fmt == "index_fp4":
                self.rotation = reference.hadamard_matrix(dim, device=device)
        # zero_() commits every page now (a server that cannot hold its pool fails at start) and keeps
        # masked slots finite: they still enter weighted sums as 0 * value
        self.tensor = torch.empty(shape, dtype=store, device=device).zero_()

    @property
    def entry_format(self) -> str | None:
        """The kernels' name for this storage format (None: float pages)."""
        return None if self.fmt == FLOAT else self.fmt

    @property
    def packed(self) -> bool:
        return self.fmt != FLOAT

    def write(self, page_ids: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Store rows x `[N, dim]` at (page, slot) pairs."""
        if not self.packed:
            self.tensor[page_ids, slots] = x.to(self.dtype)
            return
        x = x.float()
        if self.rotation is not None:
            x = x @ self.rotation
        if self.tensor.is_cuda:
            from dsv4.kernels.kv_format import write_index_entries, write_main_entries

            if self.fmt == "main_fp8":
                write_main_entries(x.contiguous(), self.tensor, page_ids.to(torch.int32), slots.to(torch.int32), self.rope_dim)
            else:
                write_index_entries(x.contiguous(), self.tensor, page_ids.to(torch.int32), slots.to(torch.int32), self.fmt[6:])
        elif self.fmt == "main_fp8":
            self._ref.write_main_pages_ref(self.tensor, page_ids, slots, x, self.rope_dim)
        else:
            self._ref.write_index_pages_ref(self.tensor, page_ids, slots, x, self.fmt[6:])

    def read(self, page_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows `[N, dim]` (in the pool's dtype; rotated for FP4 index keys)."""
        if not self.packed:
            return self.tensor[page_ids, slots]
        if self.tensor.is_cuda:
            from dsv4.kernels.kv_format import read_index_entries, read_main_entries

            ids, sl = page_ids.to(torch.int32), slots.to(torch.int32)
            if self.fmt == "main_fp8":
                out = read_main_entries(self.tensor, ids, sl, self.dim, self.rope_dim)
            else:
                out = read_index_entries(self.tensor, ids, sl, self.dim, self.fmt[6:])
        elif self.fmt == "main_fp8":
            out = self._ref.read_main_pages_ref(self.tensor, page_ids, slots, self.dim, self.rope_dim)
        else:
            out = self._ref.read_index_pages_ref(self.tensor, page_ids, slots, self.dim, self.fmt[6:])
        return out.to(self.dtype)

    def read_pages(self, page_ids: torch.Tensor) -> torch.Tensor:
        """Every row of the given pages `[P, E, dim]`."""
        if not self.packed:
            return self.tensor[page_ids]
        ids = page_ids.repeat_interleave(self.entries)
        slots = torch.arange(self.entries, device=page_ids.device).repeat(page_ids.shape[0])
        return self.read(ids, slots).view(page_ids.shape[0], self.entries, self.dim)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """x as it reads back after storage (identity for float pools): keeps freshly computed keys
        exactly equal to the stored ones they sit beside."""
        if not self.packed:
            return x.to(self.dtype).to(x.dtype)
        if self.fmt == "main_fp8":
            return self._ref.dequantize_main_ref(self._ref.quantize_main_ref(x.float(), self.rope_dim), self.dim, self.rope_dim).to(x.dtype)
        raise ValueError("round_trip is for main entries")

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
