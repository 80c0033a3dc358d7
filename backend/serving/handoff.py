"""Prefill -> decode handoff: one request's cache state as (header, payload) tensors.

The payload packs, in layer order, the live window ring, the compressed entries and index keys,
and the compressor accumulators: everything decode needs to continue exactly where prefill
stopped. It is a flat byte tensor on the storage's device, so Triton moves it as an ensemble
tensor (shared memory on a CPU, CUDA IPC on a GPU). Both sides must run the same model config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels.host_copy import to_device

from ..config import CSA, ModelConfig
from ..kv_cache.storage import KVStorage, SequenceState

FORMAT_VERSION = 1
_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class HandoffError(ValueError):
    """The payload does not fit this model or storage (version, dtype, layer layout or length)."""


@dataclass(frozen=True)
class StateHeader:
    version: int
    position: int
    num_layers: int
    window: int
    dtype_code: int
    payload_bytes: int

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.version, self.position, self.num_layers, self.window, self.dtype_code, self.payload_bytes], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StateHeader:
        values = [int(v) for v in t.flatten().tolist()]
        if len(values) != 6:
            raise HandoffError(f"kv_header has {len(values)} fields, expected 6")
        return cls(*values)


def _storage_code(storage: KVStorage) -> int:
    """Compute dtype and storage formats in one number: both sides must lay pages out alike."""
    formats = ("float", "main_fp8", "index_fp8", "index_fp4")
    return _CODES[storage.dtype] + 16 * formats.index(storage.main_format) + 256 * formats.index(storage.index_format)


def _plan(cfg: ModelConfig) -> list[tuple[str, int]]:
    """The payload's items in order: (what, layer)."""
    items: list[tuple[str, int]] = []
    for layer, kind in enumerate(cfg.layer_types):
        items.append(("ring", layer))
        if cfg.compress_rate(layer):
            items += [("comp", layer), ("acc", layer)]
            if kind == CSA:
                items += [("index", layer), ("index_acc", layer)]
    return items


def _pool(storage: KVStorage, what: str, layer: int) -> torch.Tensor:
    return {"ring": storage.ring[layer], "comp": storage.comp.get(layer), "acc": storage.acc.get(layer),
            "index": storage.index.get(layer), "index_acc": storage.index_acc.get(layer)}[what]


def _table(storage: KVStorage, seq: SequenceState, what: str, layer: int) -> list[int]:
    return seq.csa_index_blocks if what == "index" else storage.comp_blocks(seq, layer)


def _pages(storage: KVStorage, what: str, layer: int, position: int) -> int:
    """Pages of a compressed kind holding a request's entries at `position`."""
    return -(-(position // storage.cfg.compress_rate(layer)) // _pool(storage, what, layer).entries)


def _read(storage: KVStorage, seq: SequenceState, what: str, layer: int, position: int) -> torch.Tensor:
    """The raw pages (float or packed) or accumulators holding one item of the request's state."""
    pool = _pool(storage, what, layer)
    if what == "ring":
        return pool.tensor[seq.ring_block]
    if what in ("acc", "index_acc"):
        return pool[seq.state_block]
    table = to_device(_table(storage, seq, what, layer)[:_pages(storage, what, layer, position)], torch.long,
                      pool.tensor.device)
    return pool.tensor[table]


def _shape(storage: KVStorage, seq: SequenceState, what: str, layer: int,
           position: int) -> tuple[torch.Size, torch.dtype]:
    """What `_read` would return, without reading it (an import must not gather the pages it overwrites)."""
    pool = _pool(storage, what, layer)
    if what in ("ring", "acc", "index_acc"):
        like = _read(storage, seq, what, layer, position)  # a view: nothing is copied
        return like.shape, like.dtype
    return torch.Size((_pages(storage, what, layer, position), *pool.tensor.shape[1:])), pool.tensor.dtype


def _write(storage: KVStorage, seq: SequenceState, what: str, layer: int, value: torch.Tensor) -> None:
    pool = _pool(storage, what, layer)
    if what == "ring":
        pool.tensor[seq.ring_block].copy_(value)
    elif what in ("acc", "index_acc"):
        pool[seq.state_block].copy_(value)
    else:
        pages = value.shape[0]
        table = to_device(_table(storage, seq, what, layer)[:pages], torch.long, pool.tensor.device)
        pool.tensor[table] = value


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def export_state(storage: KVStorage, seq: SequenceState) -> tuple[StateHeader, torch.Tensor]:
    """Pack the request's whole cache state; the request's blocks may be freed afterwards."""
    parts = [_as_bytes(_read(storage, seq, what, layer, seq.position)) for what, layer in _plan(storage.cfg)]
    payload = torch.cat(parts)
    header = StateHeader(FORMAT_VERSION, seq.position, storage.cfg.num_layers, storage.cfg.window,
                         _storage_code(storage), payload.numel())
    return header, payload


def import_state(storage: KVStorage, seq: SequenceState, header: StateHeader, payload: torch.Tensor) -> None:
    """Unpack an exported state into `seq`'s blocks (already reserved) and set its position."""
    cfg: ModelConfig = storage.cfg
    if header.version != FORMAT_VERSION:
        raise HandoffError(f"kv_header version {header.version}, expected {FORMAT_VERSION}")
    if (header.num_layers, header.window) != (cfg.num_layers, cfg.window) or header.dtype_code != _storage_code(storage):
        raise HandoffError(f"kv state for {header.num_layers} layers / window {header.window} / dtype code "
                           f"{header.dtype_code} does not match this model's cache")
    if payload.numel() != header.payload_bytes:
        raise HandoffError(f"kv_state has {payload.numel()} bytes, header says {header.payload_bytes}")
    payload = payload.to(storage.device).view(torch.uint8).view(-1)
    offset = 0
    for what, layer in _plan(cfg):
        shape, dtype = _shape(storage, seq, what, layer, header.position)
        size = shape.numel() * dtype.itemsize
        if offset + size > payload.numel():
            raise HandoffError("kv_state is shorter than its layout needs")
        value = payload[offset:offset + size].view(dtype).view(shape)
        _write(storage, seq, what, layer, value)
        offset += size
    if offset != payload.numel():
        raise HandoffError(f"kv_state has {payload.numel() - offset} bytes more than its layout needs")
    seq.position = header.position
