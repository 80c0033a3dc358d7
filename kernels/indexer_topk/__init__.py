"""Lightning-Indexer scores + exact top-k (fused radix select), decode and prefill."""

from .kernel import indexer_topk_decode, indexer_topk_prefill, indexer_topk_prefill_batch
from .reference import indexer_topk_decode_ref, indexer_topk_prefill_ref

__all__ = ["indexer_topk_decode", "indexer_topk_decode_ref", "indexer_topk_prefill", "indexer_topk_prefill_batch",
           "indexer_topk_prefill_ref"]
