"""Scaled dot-product attention over any number of sequences.

CUDA's fused SDPA kernels put the batch (sequences x heads share the launch grid) on a grid axis
limited to 65,535 blocks, so a call with more sequences fails. The DiT's temporal attention runs
``batch x positions`` sequences (144 per video at patch size 1; twice that with guidance), which
passes the limit near 228 videos per call. Longer batches are split into calls below it; the
result is the same, sequence by sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SEQUENCES = 65_535


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_sequences: int | None = None) -> torch.Tensor:
    """``q (N, heads, S, d)``, ``k, v (N, heads, S_kv, d)`` -> ``(N, heads, S, d)``, at most
    ``max_sequences`` (default ``MAX_SEQUENCES``) sequences per SDPA call."""
    limit = MAX_SEQUENCES if max_sequences is None else max_sequences
    n = q.shape[0]
    if n <= limit:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[i:i + limit], k[i:i + limit], v[i:i + limit])
                      for i in range(0, n, limit)])
