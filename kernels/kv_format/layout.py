"""Byte layouts of the quantized KV storage formats (see docs/KV_CACHE.md, "Storage formats").

A page holds `E` entries as planes so every plane is aligned:

- main K=V entry, FP8: `[E x nope e4m3][E x rope bf16][E x scale_bytes ue8m0]`, where
  `nope = head_dim - rope_dim` (a multiple of 64), one ue8m0 scale per 64 nope dims, the scale slot
  padded with zeros to a multiple of 8 bytes. V4 (512/64): 448 + 128 + 8 = 584 bytes per entry.
- index key, FP8: `[E x dim e4m3][E x float32 scale]` (dim + 4 bytes per entry; 132 for dim 128).
- index key, FP4: `[E x dim/2 packed e2m1, low nibble = even dim][E x dim/32 ue8m0]` (68 for dim 128).

A contiguous `[N, entry_bytes]` uint8 tensor is the same layout with `E = 1` (N pages of one entry).
"""

from __future__ import annotations

from dataclasses import dataclass

FP8_MAX = 448.0
MAIN_GROUP = 64
MAIN_SCALE_FLOOR = 1e-4
INDEX_FP8_SCALE_FLOOR = 1e-4
FP4_MAX = 6.0
FP4_GROUP = 32
FP4_SCALE_FLOOR = 6.0 * 2.0**-126
UE8M0_BIAS = 127
INDEX_FORMATS = ("fp8", "fp4")


@dataclass(frozen=True)
class MainLayout:
    """FP8 main K=V entry: nope dims as e4m3 with one power-of-two scale per 64 dims, rope dims bf16."""

    head_dim: int
    rope_dim: int

    def __post_init__(self) -> None:
        assert 0 < self.rope_dim < self.head_dim and self.rope_dim % 2 == 0, (self.head_dim, self.rope_dim)
        assert self.nope_dim % MAIN_GROUP == 0, f"nope dims {self.nope_dim} must be a multiple of {MAIN_GROUP}"

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def num_groups(self) -> int:
        return self.nope_dim // MAIN_GROUP

    @property
    def scale_bytes(self) -> int:
        return -(-self.num_groups // 8) * 8

    @property
    def entry_bytes(self) -> int:
        return self.nope_dim + 2 * self.rope_dim + self.scale_bytes

    def rope_offset(self, entries_per_page: int) -> int:
        return entries_per_page * self.nope_dim

    def scale_offset(self, entries_per_page: int) -> int:
        return entries_per_page * (self.nope_dim + 2 * self.rope_dim)

    def entries_per_page(self, page_bytes: int) -> int:
        assert page_bytes % self.entry_bytes == 0, f"page of {page_bytes} B is not a whole number of {self.entry_bytes} B entries"
        return page_bytes // self.entry_bytes


@dataclass(frozen=True)
class IndexLayout:
    """Lightning-Indexer key: FP8 (e4m3 + float32 scale) or FP4 (packed e2m1 + ue8m0 per 32 dims)."""

    dim: int
    fmt: str

    def __post_init__(self) -> None:
        assert self.fmt in INDEX_FORMATS, self.fmt
        assert self.dim % FP4_GROUP == 0, f"index dim {self.dim} must be a multiple of {FP4_GROUP}"

    @property
    def value_bytes(self) -> int:
        return self.dim if self.fmt == "fp8" else self.dim // 2

    @property
    def scale_bytes(self) -> int:
        return 4 if self.fmt == "fp8" else self.dim // FP4_GROUP

    @property
    def entry_bytes(self) -> int:
        return self.value_bytes + self.scale_bytes

    def scale_offset(self, entries_per_page: int) -> int:
        return entries_per_page * self.value_bytes

    def entries_per_page(self, page_bytes: int) -> int:
        assert page_bytes % self.entry_bytes == 0, f"page of {page_bytes} B is not a whole number of {self.entry_bytes} B entries"
        return page_bytes // self.entry_bytes


def main_entry_bytes(head_dim: int, rope_dim: int) -> int:
    return MainLayout(head_dim, rope_dim).entry_bytes


def index_entry_bytes(dim: int, fmt: str) -> int:
    return IndexLayout(dim, fmt).entry_bytes
