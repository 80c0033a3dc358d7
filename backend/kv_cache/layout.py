"""Byte arithmetic of the hybrid KV cache: kinds, pages, blocks, and the paper's theory beside them.

Pure integer arithmetic over a `ModelConfig` (no tensors), following docs/KV_CACHE.md: one
logical block is 256 positions for every kind, a block id of a kind names one page in every
layer of that kind, and a request holds one block table per kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..config import CSA, HCA, ModelConfig

BLOCK_TOKENS = 256
KINDS = ("swa", "csa_kv", "csa_index", "hca_kv", "state")
# one block per live request, whatever its length
FIXED_KINDS = ("swa", "state")
# one block per 256 positions; these are what prefix caching shares
COMPRESSED_KINDS = ("csa_kv", "csa_index", "hca_kv")
MAIN_FORMATS = ("fp8", "bf16", "fp32")
INDEX_FORMATS = ("fp8", "fp4", "bf16", "fp32")
_FLOAT32 = 4


class LayoutError(ValueError):
    """The model shape or storage format cannot be laid out in 256-position blocks."""


class KindCounts(NamedTuple):
    """One integer per cache kind (blocks, bytes, ...), in `KINDS` order."""

    swa: int
    csa_kv: int
    csa_index: int
    hca_kv: int
    state: int

    def total(self) -> int:
        return sum(self)


class RequestBytes(NamedTuple):
    """Bytes one request of a given length holds: per kind, and split into fixed and growing."""

    per_kind: KindCounts
    fixed: int
    growing: int
    total: int


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def main_entry_bytes(cfg: ModelConfig, fmt: str) -> int:
    """Bytes of one main K=V entry (window or compressed) stored in `fmt`."""
    if fmt == "fp8":
        nope = cfg.head_dim - cfg.rope_dim
        if nope % 64:
            raise LayoutError(f"fp8 main entries need head_dim - rope_dim divisible by 64, got {nope}")
        # e4m3 nope values, bf16 rope values, one ue8m0 scale per 64 nope dims padded to an 8-byte plane
        return nope + 2 * cfg.rope_dim + _round_up(nope // 64, 8)
    if fmt == "bf16":
        return 2 * cfg.head_dim
    if fmt == "fp32":
        return 4 * cfg.head_dim
    raise LayoutError(f"unknown main entry format {fmt!r}; expected one of {list(MAIN_FORMATS)}")


def index_key_bytes(cfg: ModelConfig, fmt: str) -> int:
    """Bytes of one Lightning-Indexer key stored in `fmt`."""
    dim = cfg.index_head_dim
    if fmt == "fp8":
        # e4m3 values and one float32 scale
        return dim + 4
    if fmt == "fp4":
        if dim % 32:
            raise LayoutError(f"fp4 index keys need index_head_dim divisible by 32, got {dim}")
        # packed e2m1 pairs and one ue8m0 scale per 32 dims
        return dim // 2 + dim // 32
    if fmt == "bf16":
        return 2 * dim
    if fmt == "fp32":
        return 4 * dim
    raise LayoutError(f"unknown index key format {fmt!r}; expected one of {list(INDEX_FORMATS)}")


@dataclass(frozen=True)
class StorageFormat:
    """How entries are stored: bytes of one main K=V entry and of one indexer key.

    Build it with `StorageFormat.named(cfg, "fp8", "fp4")`; at V4 shapes the named formats give
    fp8 584 B main, fp8 132 B / fp4 68 B index keys, bf16 1024 / 256 B, fp32 2048 / 512 B.
    """

    main: str
    index: str
    main_entry_bytes: int
    index_key_bytes: int

    def __post_init__(self) -> None:
        for name in ("main_entry_bytes", "index_key_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LayoutError(f"StorageFormat.{name} = {value!r}: must be a positive integer")

    @property
    def name(self) -> str:
        return f"{self.main}+{self.index}"

    @classmethod
    def named(cls, cfg: ModelConfig, main: str = "fp8", index: str | None = None) -> StorageFormat:
        """`index` defaults to fp8 next to fp8 main entries, else to the main format (the CPU layouts)."""
        if index is None:
            index = "fp8" if main == "fp8" else main
        return cls(main, index, main_entry_bytes(cfg, main), index_key_bytes(cfg, index))


@dataclass(frozen=True)
class KindLayout:
    """How one cache kind is paged.

    A block id of this kind names one page in each of `layers`; `page_bytes[i]` is the page size
    in `layers[i]` (equal across layers except for `state`, where CSA and HCA layers differ).
    A kind with no layers is absent: requests hold no blocks of it.
    """

    kind: str
    layers: tuple[int, ...]
    entries_per_block: int
    page_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.page_bytes) != len(self.layers):
            raise LayoutError(f"kind {self.kind!r}: {len(self.page_bytes)} page sizes for {len(self.layers)} layers")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def block_bytes(self) -> int:
        return sum(self.page_bytes)


def check_rates(csa_rate: int, hca_rate: int) -> None:
    for name, rate in (("csa_rate", csa_rate), ("hca_rate", hca_rate)):
        if rate <= 0 or BLOCK_TOKENS % rate:
            raise LayoutError(
                f"config field '{name}' = {rate}: must divide the {BLOCK_TOKENS}-position KV block "
                f"so compressed entries never straddle two blocks"
            )


@dataclass(frozen=True)
class KVLayout:
    """Per-kind paging of one model in one storage format; built once by `from_config`.

    `kinds` lists every kind of `KINDS` in that order, absent ones with no layers. Block counts
    and bytes are exact for a request of T positions; `theory_bytes` is V4_SPEC §4.2 split the
    same way (rings under `swa`, compressed entries under their kind, nothing under `state`).
    """

    window: int
    csa_rate: int
    hca_rate: int
    fmt: StorageFormat
    kinds: tuple[KindLayout, ...]

    def __post_init__(self) -> None:
        check_rates(self.csa_rate, self.hca_rate)
        if tuple(k.kind for k in self.kinds) != KINDS:
            raise LayoutError(f"kinds must be {list(KINDS)} in that order")

    @classmethod
    def from_config(cls, cfg: ModelConfig, fmt: StorageFormat | str = "fp8") -> KVLayout:
        check_rates(cfg.csa_rate, cfg.hca_rate)
        if isinstance(fmt, str):
            fmt = StorageFormat.named(cfg, fmt)
        e, e_index = fmt.main_entry_bytes, fmt.index_key_bytes
        every = tuple(range(cfg.num_layers))
        csa, hca = cfg.layers_of(CSA), cfg.layers_of(HCA)
        csa_per_block, hca_per_block = BLOCK_TOKENS // cfg.csa_rate, BLOCK_TOKENS // cfg.hca_rate
        csa_state = 2 * 3 * (cfg.head_dim + cfg.index_head_dim) * _FLOAT32
        hca_state = 3 * cfg.head_dim * _FLOAT32
        compressed = tuple(sorted(csa + hca))
        kinds = (
            KindLayout("swa", every, cfg.window, (cfg.window * e,) * len(every)),
            KindLayout("csa_kv", csa, csa_per_block, (csa_per_block * e,) * len(csa)),
            KindLayout("csa_index", csa, csa_per_block, (csa_per_block * e_index,) * len(csa)),
            KindLayout("hca_kv", hca, hca_per_block, (hca_per_block * e,) * len(hca)),
            KindLayout("state", compressed, 1, tuple(csa_state if i in csa else hca_state for i in compressed)),
        )
        return cls(window=cfg.window, csa_rate=cfg.csa_rate, hca_rate=cfg.hca_rate, fmt=fmt, kinds=kinds)

    def kind(self, name: str) -> KindLayout:
        if name not in KINDS:
            raise KeyError(f"unknown cache kind {name!r}; expected one of {list(KINDS)}")
        return self.kinds[KINDS.index(name)]

    @property
    def present(self) -> tuple[str, ...]:
        """Kinds with at least one layer: the ones that get a block pool."""
        return tuple(k.kind for k in self.kinds if k.layers)

    @property
    def block_bytes(self) -> KindCounts:
        return KindCounts(*(k.block_bytes for k in self.kinds))

    def rate(self, kind: str) -> int:
        """Positions pooled per entry of a compressed kind."""
        if kind in ("csa_kv", "csa_index"):
            return self.csa_rate
        if kind == "hca_kv":
            return self.hca_rate
        raise KeyError(f"kind {kind!r} is not compressed")

    def blocks_for_tokens(self, num_tokens: int) -> KindCounts:
        """Blocks of each kind a live request spanning positions 0..num_tokens-1 holds.

        Fixed kinds: one block (present even at 0 positions); compressed kinds:
        ceil(floor(T / rate) / (256 / rate)), i.e. only completed entries need room.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens = {num_tokens}: must be >= 0")
        counts = []
        for k in self.kinds:
            if not k.layers:
                counts.append(0)
            elif k.kind in FIXED_KINDS:
                counts.append(1)
            else:
                entries = num_tokens // self.rate(k.kind)
                counts.append(-(-entries // k.entries_per_block))
        return KindCounts(*counts)

    def request_bytes(self, num_tokens: int) -> RequestBytes:
        """Bytes a request of num_tokens positions holds, exactly as the manager allocates them."""
        blocks = self.blocks_for_tokens(num_tokens)
        per_kind = KindCounts(*(n * b for n, b in zip(blocks, self.block_bytes)))
        fixed = per_kind.swa + per_kind.state
        return RequestBytes(per_kind, fixed, per_kind.total() - fixed, per_kind.total())

    def theory_bytes(self, num_tokens: int) -> KindCounts:
        """V4_SPEC §4.2 per kind: SWA window*e, CSA (window + T/4)*e + T/4*e_I, HCA (window + T/128)*e.

        The rings of every layer are under `swa`; the accumulators (`state`) count zero, as in the paper.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens = {num_tokens}: must be >= 0")
        e, e_index = self.fmt.main_entry_bytes, self.fmt.index_key_bytes
        n_csa, n_hca = self.kind("csa_kv").num_layers, self.kind("hca_kv").num_layers
        csa_entries, hca_entries = num_tokens // self.csa_rate, num_tokens // self.hca_rate
        return KindCounts(
            swa=self.kind("swa").num_layers * self.window * e,
            csa_kv=n_csa * csa_entries * e,
            csa_index=n_csa * csa_entries * e_index,
            hca_kv=n_hca * hca_entries * e,
            state=0,
        )

    def theory_total_bytes(self, num_tokens: int) -> int:
        return self.theory_bytes(num_tokens).total()
