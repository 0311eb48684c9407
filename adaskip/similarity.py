"""The IO-similarity rule (docs/architecture.md, "The method"): the one definition every backend reproduces.

For the residual stream h entering a sublayer and h' leaving it, over the valid tokens of one request:
  s = mean over tokens of cos(h_t, h'_t)        (cosine over the hidden dimension)
  r = ||h'||_F / ||h||_F                         (Frobenius norm over the request's tokens)
"""

from __future__ import annotations

import torch

EPS = 1e-12


def io_similarity(h: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h, h_out: [B, T, D]; valid: [B, T] bool. Returns (s, r), each [B] float32."""
    h, h_out = h.float(), h_out.float()
    w = valid.float()
    dot = (h * h_out).sum(-1)
    n_in = (h * h).sum(-1)
    n_out = (h_out * h_out).sum(-1)
    cos = dot / (n_in.sqrt() * n_out.sqrt()).clamp_min(EPS)
    count = w.sum(-1).clamp_min(1.0)
    s = (cos * w).sum(-1) / count
    r = ((n_out * w).sum(-1) / (n_in * w).sum(-1).clamp_min(EPS)).sqrt()
    return s, r
