"""Segment-text contrastive loss, eq. (1) of the paper, and its all-gather form for DDP."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


def text_ids(texts: Sequence[str]) -> torch.Tensor:
    """A stable 63-bit id per text (equal strings ↔ equal ids, on every rank and in every run)."""
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little") >> 1 for t in texts],
        dtype=torch.int64,
    )


def contrastive_loss(
    seg: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, logit_scale: float, mask_same_text: bool = True
) -> torch.Tensor:
    """Symmetric InfoNCE over k segment-text pairs (eq. 1): rows of ``seg`` and ``txt`` are
    L2-normalised and pair i is (seg[i], txt[i]); ``ids`` identify the texts.

    Temperature: eq. (1) divides by τ and §4.2 sets τ = 30. Dividing unit-vector dot products (in
    [-1, 1]) by 30 would flatten the softmax to near uniform, so "τ = 30" can only be the logit scale
    s·t × 30, i.e. a temperature of 1/30 ≈ 0.033, the same regime as CLIP's learned scale of 100.
    ``logit_scale`` is that multiplier.

    False negatives (``mask_same_text``, the setting ``train.mask_same_text``): when two segments in
    the batch drew the same text (two "person" segments), each is a correct match for the other's
    text, yet eq. (1) counts it as a negative. With the mask their off-diagonal logits are removed
    from both softmaxes (set to -inf), so neither is pushed away from a text that describes it; every
    row keeps exactly one positive, its own pair, and eq. (1) is unchanged when all texts differ.
    Without it the loss is eq. (1) as written.
    """
    k = seg.shape[0]
    if k == 0:  # no segment survived the crops: a zero that keeps the graph (DDP needs a backward)
        return seg.sum() * 0.0
    logits = logit_scale * seg.float() @ txt.float().T
    if mask_same_text:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(k, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different numbers). The local rows keep their
    autograd graph; other ranks' rows are constants here and get their gradient on their own rank."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    parts = [b[:c] for b, c in zip(bufs, counts)]
    parts[rank] = x
    return torch.cat(parts)


def global_contrastive_loss(
    seg: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, logit_scale: float, mask_same_text: bool = True
) -> torch.Tensor:
    """Eq. (1) over the segments of all ranks (every rank computes the same value). Each rank's
    backward gives the gradient through its own rows only; DDP averages those over ranks, so callers
    multiply this loss by the world size to get the full gradient of eq. (1)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return contrastive_loss(seg, txt, ids, logit_scale, mask_same_text)
    return contrastive_loss(gather_rows(seg), gather_rows(txt), gather_rows(ids), logit_scale, mask_same_text)
