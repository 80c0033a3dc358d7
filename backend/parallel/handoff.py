"""A request's exported cache state (`serving.handoff`) sent from one rank to another over the group.

The header goes first (six int64 fields), so the receiver can size the payload before it arrives.
Tensors travel on the CPU, as gloo needs; an nccl group would need them on the device.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist

from ..serving.handoff import StateHeader

HEADER_FIELDS = len(fields(StateHeader))


def send_state(header: StateHeader, payload: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    dist.send(header.to_tensor(), dst, group=group)
    dist.send(payload.contiguous().view(torch.uint8), dst, group=group)


def recv_state(src: int, group: dist.ProcessGroup) -> tuple[StateHeader, torch.Tensor]:
    """(header, payload bytes) as `send_state` sent them; hand both to `serving.handoff.import_state`."""
    values = torch.empty(HEADER_FIELDS, dtype=torch.int64)
    dist.recv(values, src, group=group)
    header = StateHeader.from_tensor(values)
    payload = torch.empty(header.payload_bytes, dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return header, payload
