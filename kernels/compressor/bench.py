"""GPU benchmark of the compressor: one decode step (CSA main, HCA main, indexer keys) and a prefill chunk."""

from __future__ import annotations

import torch

from ..benchmarking import BenchRow, CheckFailed, ModelShape, bench_device, time_us
from ..kv_format.layout import IndexLayout, MainLayout
from ..kv_format.reference import (
    hadamard_matrix,
    index_planes,
    main_planes,
    quantize_index_ref,
    quantize_main_ref,
    scatter_entries_ref,
)
from ..sparse_decode.bench import rope_inv_freq
from ..sparse_decode.reference import rotate_interleaved_ref
from .kernel import compressor_decode, compressor_prefill
from .reference import compressor_decode_ref, compressor_prefill_ref


def torch_compressor_decode(a, z, position_bias, norm_weight, inv_freq, state, state_block, positions, pool, block_table,
                            rate, eps, entry_format, hadamard):
    """Plain batched PyTorch decode step: accumulator update, masked emission, quantize + scatter, state shift."""
    d = norm_weight.shape[0]
    overlap = a.shape[1] == 2 * d
    sb = state_block.long()
    st = state[sb]  # [B, A, 3, D]
    zb = z.float() + position_bias[positions % rate]

    def add(acc, zz, aa):
        m_new = torch.maximum(acc[:, 0], zz)
        decay, p = torch.exp(acc[:, 0] - m_new), torch.exp(zz - m_new)
        return torch.stack([m_new, acc[:, 1] * decay + p, acc[:, 2] * decay + p * aa], 1)

    empty = torch.zeros_like(st[:, 0])
    empty[:, 0] = float("-inf")
    if overlap:
        acc0, acc1 = add(st[:, 0], zb[:, d:], a[:, d:].float()), add(st[:, 1], zb[:, :d], a[:, :d].float())
    else:
        acc0 = add(st[:, 0], zb, a.float())
    emit = (positions + 1) % rate == 0
    rows = emit.nonzero().squeeze(1)
    if rows.numel():
        y = acc0[rows, 2] / acc0[rows, 1]
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps) * norm_weight
        anchor = (positions[rows] + 1 - rate).float()
        y = rotate_interleaved_ref(y, anchor[:, None] * inv_freq[None, :])
        if hadamard is not None:
            y = y @ hadamard
        j = (positions[rows] + 1) // rate - 1
        page_rows = block_table[rows]
        e = _entries(pool, d, 2 * inv_freq.shape[0], entry_format)
        page = page_rows.gather(1, (j // e)[:, None]).squeeze(1)
        if entry_format == "main_fp8":
            packed, planes = quantize_main_ref(y, 2 * inv_freq.shape[0]), main_planes(d, 2 * inv_freq.shape[0])
        else:
            fmt = entry_format.removeprefix("index_")
            packed, planes = quantize_index_ref(y, fmt), index_planes(d, fmt)
        scatter_entries_ref(pool, page, j % e, packed, planes)
    if overlap:
        new0 = torch.where(emit[:, None, None], acc1, acc0)
        new1 = torch.where(emit[:, None, None], empty, acc1)
        state[sb] = torch.stack([new0, new1], 1)
    else:
        state[sb] = torch.where(emit[:, None, None], empty, acc0)[:, None]


def state_close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Running maxima equal (-inf for empty accumulators), sums within float32 tolerance."""
    return torch.equal(got[..., 0, :], want[..., 0, :]) and torch.allclose(got[..., 1:, :], want[..., 1:, :], rtol=1e-4, atol=1e-4)


def _entries(pool, d, r, entry_format):
    if entry_format == "main_fp8":
        return MainLayout(d, r).entries_per_page(pool.shape[1])
    return IndexLayout(d, entry_format.removeprefix("index_")).entries_per_page(pool.shape[1])


def _valid_state(num_states, num_acc, d, dev, gen):
    st = torch.empty(num_states, num_acc, 3, d, device=dev)
    st[:, :, 0] = torch.randn(num_states, num_acc, d, device=dev, generator=gen)
    st[:, :, 1] = 1 + torch.rand(num_states, num_acc, d, device=dev, generator=gen) * 3
    st[:, :, 2] = torch.randn(num_states, num_acc, d, device=dev, generator=gen)
    return st


LAYERS = {  # name: (dim attr, rate attr, overlap, entry format, hadamard)
    "csa": ("head_dim", "csa_rate", True, "main_fp8", False),
    "hca": ("head_dim", "hca_rate", False, "main_fp8", False),
    "index": ("index_dim", "csa_rate", True, "index_fp4", True),
}


def bench(model: ModelShape, batch: int, context: int) -> list[BenchRow]:
    """Decode: every request at position context - 1 (an emitting step for both rates when context % 128 == 0)."""
    dev = bench_device()
    rows = []
    for layer, (dim_attr, rate_attr, overlap, fmt, use_had) in LAYERS.items():
        d, rate = getattr(model, dim_attr), getattr(model, rate_attr)
        r = model.rope_dim
        width = 2 * d if overlap else d
        num_acc = 2 if overlap else 1
        e = model.block_positions // rate
        eb = MainLayout(d, r).entry_bytes if fmt == "main_fp8" else IndexLayout(d, "fp4").entry_bytes
        gen = torch.Generator(device=dev)
        gen.manual_seed(batch + 3)
        blocks = -(-(context // rate) // e) + 1
        pool = torch.zeros(batch * blocks, e * eb, dtype=torch.uint8, device=dev)
        table = torch.randperm(batch * blocks, device=dev, generator=gen).to(torch.int32).view(batch, blocks)
        state = _valid_state(batch, num_acc, d, dev, gen)
        sblock = torch.randperm(batch, device=dev, generator=gen).to(torch.int32)
        pos = torch.full((batch,), context - 1, dtype=torch.int64, device=dev)
        a = torch.randn(batch, width, device=dev, generator=gen)
        z = torch.randn(batch, width, device=dev, generator=gen)
        bias = torch.randn(rate, width, device=dev, generator=gen)
        norm_w = torch.ones(d, device=dev)
        inv = rope_inv_freq(r, dev)
        had = hadamard_matrix(d, device=dev) if use_had else None
        args = dict(rate=rate, entry_format=fmt, hadamard=had)
        st_k, pool_k = state.clone(), pool.clone()
        compressor_decode(a, z, bias, norm_w, inv, st_k, sblock, pos, pool_k, table, **args)
        m = min(batch, 4)
        st_r, _, _ = compressor_decode_ref(a[:m].cpu(), z[:m].cpu(), bias.cpu(), norm_w.cpu(), inv.cpu(), state.cpu(), sblock[:m].cpu(),
                                           pos[:m].cpu(), pool.cpu(), table[:m].cpu(), rate, 1e-6, fmt, had.cpu() if had is not None else None)
        if not state_close(st_k[sblock[:m].long()].cpu(), st_r[sblock[:m].long().cpu()]):
            raise CheckFailed(f"compressor.{layer}: state differs from the reference")
        st_b, pool_b = state.clone(), pool.clone()
        torch_compressor_decode(a, z, bias, norm_w, inv, st_b, sblock, pos, pool_b, table, rate, 1e-6, fmt, had)
        fin = torch.isfinite(st_b)
        if not torch.allclose(st_k[fin], st_b[fin], rtol=1e-4, atol=1e-4) or (pool_k != pool_b).float().mean() > 1e-3:
            raise CheckFailed(f"compressor.{layer}: kernel and torch baseline disagree")
        us = time_us(lambda: compressor_decode(a, z, bias, norm_w, inv, st_k, sblock, pos, pool_k, table, **args), graph=True)
        ref_us = time_us(lambda: torch_compressor_decode(a, z, bias, norm_w, inv, st_b, sblock, pos, pool_b, table, rate, 1e-6, fmt, had))
        emitted = int(((pos + 1) % rate == 0).sum())
        nbytes = batch * (2 * width * 4 + 2 * num_acc * 3 * d * 4 + width * 4) + emitted * eb
        rows.append(BenchRow(f"compressor.decode_{layer}", f"{model.name} B={batch}", us, bytes=nbytes, ref_us=ref_us,
                             note="context-independent"))
    return rows


def bench_prefill(model: ModelShape, context: int, chunk: int = 8192) -> list[BenchRow]:
    """One request, T = min(context, chunk) tokens ending at `context`, CSA main entries (FP8 pages)."""
    dev = bench_device()
    d, rate, r = model.head_dim, model.csa_rate, model.rope_dim
    t_len = min(context, chunk)
    start = context - t_len
    e = model.csa_entries
    eb = MainLayout(d, r).entry_bytes
    blocks = -(-(context // rate) // e) + 1
    gen = torch.Generator(device=dev)
    gen.manual_seed(context)
    pool = torch.zeros(blocks, e * eb, dtype=torch.uint8, device=dev)
    table = torch.randperm(blocks, device=dev, generator=gen).to(torch.int32)
    state = _valid_state(1, 2, d, dev, gen)
    a = torch.randn(t_len, 2 * d, device=dev, generator=gen)
    z = torch.randn(t_len, 2 * d, device=dev, generator=gen)
    bias = torch.randn(rate, 2 * d, device=dev, generator=gen)
    norm_w = torch.ones(d, device=dev)
    inv = rope_inv_freq(r, dev)
    cfg = f"{model.name} T={t_len} ctx={context}"
    st_k, pool_k = state.clone(), pool.clone()
    check_len = min(t_len, 256)
    compressor_prefill(a[:check_len], z[:check_len], bias, norm_w, inv, st_k, 0, start, pool_k, table, rate=rate, entry_format="main_fp8")
    st_r, _, _ = compressor_prefill_ref(a[:check_len].cpu(), z[:check_len].cpu(), bias.cpu(), norm_w.cpu(), inv.cpu(), state[0].cpu(),
                                        start, pool.cpu(), table.cpu(), rate, 1e-6, "main_fp8")
    if not state_close(st_k[0].cpu(), st_r):
        raise CheckFailed("compressor prefill: state differs from the reference")
    us = time_us(lambda: compressor_prefill(a, z, bias, norm_w, inv, st_k, 0, start, pool_k, table, rate=rate, entry_format="main_fp8"))
    nbytes = t_len * 2 * 2 * d * 4 + (t_len // rate) * eb
    return [BenchRow("compressor.prefill_csa", cfg, us, bytes=nbytes, note=f"checked on the first {check_len} tokens")]
