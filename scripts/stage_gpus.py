"""Which GPUs the served stages run on (`dsv4-serve --decode-gpus`, `--prefill-gpus`).

Decode is one engine on one GPU. Prefill runs one Triton instance per listed GPU, in the split
layout, all feeding the one decode instance; Triton's scheduler picks the instance for each prompt
(prefill is decoupled, so every instance looks free to it: the choice does not follow the engines'
load). The colocated layout runs prefill inside decode's process, so on decode's GPU only.

Every stage is pinned (`gpus: [...]` in its instance group): an unpinned `KIND_GPU` group makes
one instance per visible GPU, which on a multi-GPU host would start a decode engine on each.
A GPU that holds both stages splits `--gpu-memory-utilization` between them by
`--prefill-memory-share`; a GPU that holds one stage gives it the whole share.
"""

from __future__ import annotations

from dataclasses import dataclass


class PlacementError(ValueError):
    """A GPU list the server cannot run with; the message names the option."""


def parse_gpus(text: str, option: str) -> tuple[int, ...]:
    """"0,1" -> (0, 1); refused with the option named: not integers, negative, repeated or empty."""
    try:
        gpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise PlacementError(f"{option} {text!r}: expected GPU indices separated by commas, e.g. 0,1") from None
    if not gpus or any(g < 0 for g in gpus):
        raise PlacementError(f"{option} {text!r}: GPU indices are integers >= 0")
    if len(set(gpus)) != len(gpus):
        raise PlacementError(f"{option} {text!r}: a GPU is listed twice")
    return gpus


@dataclass(frozen=True)
class StageGpus:
    decode: int
    prefill: tuple[int, ...]

    @classmethod
    def from_options(cls, decode: str | None, prefill: str | None) -> StageGpus:
        decode_gpus = parse_gpus(decode, "--decode-gpus") if decode is not None else (0,)
        if len(decode_gpus) != 1:
            raise PlacementError(f"--decode-gpus {decode}: decode runs one engine on one GPU "
                                 "(several GPUs for one model: --tensor-parallel / --expert-parallel)")
        prefill_gpus = parse_gpus(prefill, "--prefill-gpus") if prefill is not None else decode_gpus
        return cls(decode_gpus[0], prefill_gpus)

    @property
    def disaggregated(self) -> bool:
        """Prefill runs somewhere decode does not."""
        return self.prefill != (self.decode,)

    @property
    def used(self) -> tuple[int, ...]:
        return tuple(sorted({self.decode, *self.prefill}))

    def check(self, visible: int, colocated: bool) -> None:
        """Refuse GPUs this host does not have, and prefill GPUs the colocated layout cannot use."""
        missing = [g for g in self.used if g >= visible]
        if missing:
            raise PlacementError(f"GPU {missing[0]} is not there: this process sees {visible} GPU(s) "
                                 f"(--decode-gpus / --prefill-gpus count from 0)")
        if colocated and self.disaggregated:
            raise PlacementError("--prefill-gpus other than decode's GPU need --stage-layout split "
                                 "(colocated runs prefill inside decode's process, on its GPU)")

    def decode_fraction(self, utilization: float, prefill_share: float, colocated: bool) -> float:
        # colocated: decode's process holds both stages, so it gets the whole share
        shared = not colocated and self.decode in self.prefill
        return utilization * (1 - prefill_share if shared else 1)

    def prefill_fractions(self, utilization: float, prefill_share: float) -> str:
        """Each prefill GPU's memory fraction, "gpu=fraction,..." (`triton_io.memory_fraction` reads it)."""
        return ",".join(f"{g}={utilization * (prefill_share if g == self.decode else 1):.4f}" for g in self.prefill)

    @staticmethod
    def instance_gpus(gpus: tuple[int, ...]) -> str:
        """The tail of an instance group's `{ kind: KIND_GPU, count: 1 ... }`: one instance per GPU."""
        return f", gpus: [ {', '.join(str(g) for g in gpus)} ]"
