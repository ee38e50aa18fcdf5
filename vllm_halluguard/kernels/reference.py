"""Dense torch attention for a few rows, with what the methods need beyond the output.

Every engine path is tested against this: for query rows at absolute positions ``q_pos`` over keys
``0..S-1`` it returns the attention output, the row log-sum-exp and the row entropy, with an
optional per-row, per-head *sink logit* (a key with logit ``sink`` and a zero value vector: it takes
softmax mass that is then dropped, which is FarSight's register mass ``R = exp(sink)``).
"""

from __future__ import annotations

import torch


def attention_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, q_pos: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 causal logits ``[T, Hq, S]`` of ``q [T, Hq, D]`` on ``k [S, Hkv, D]``; masked keys ``-inf``."""
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    qf = q.float().reshape(t, hkv, hq // hkv, d)
    logits = torch.einsum("tkgd,skd->tkgs", qf, k.float()).reshape(t, hq, s) * scale
    allowed = torch.arange(s, device=q.device)[None, :] <= q_pos[:, None]
    if key_mask is not None:
        allowed = allowed & key_mask[None, :]
    return logits.masked_fill(~allowed[:, None, :], float("-inf"))


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    sink: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of ``q [T, Hq, D]`` over ``k, v [S, Hkv, D]`` (GQA by head grouping).

    ``q_pos [T]``: each row attends to keys ``0..q_pos``. ``sink [T, Hq]`` (``-inf`` = none) adds
    a dropped-mass logit per row and head. ``key_mask [S]`` (bool) removes keys (PruneHal).
    Returns ``out [T, Hq, D]`` (input dtype; scaled down by the sink's share of the mass), and the
    fp32 ``lse [T, Hq]`` and ``entropy [T, Hq]`` of the plain row (real keys only, no sink).
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    logits = attention_logits(q, k, scale, q_pos, key_mask)
    lse = torch.logsumexp(logits, dim=-1)  # plain row normaliser
    probs = torch.exp(logits - lse[..., None])
    entropy = -(probs * torch.where(probs > 0, logits - lse[..., None], 0.0)).sum(-1)
    if sink is not None:
        total = torch.logaddexp(lse, sink.float())
        probs = probs * torch.exp(lse - total)[..., None]
    out = torch.einsum("tkgs,skd->tkgd", probs.reshape(t, hkv, hq // hkv, -1), v.float()).reshape(t, hq, d)
    return out.to(q.dtype), lse, entropy


def attention_logits_padded(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor
) -> torch.Tensor:
    """fp32 logits ``[B, Hq, S]`` of one query per row ``q [B, Hq, D]`` on padded ``k [B, S, Hkv, D]``.

    ``key_mask [B, S]`` (bool) holds each row's visible keys (its length, and any pruned keys off);
    hidden keys get ``-inf``. Row ``b`` equals :func:`attention_logits` of that row alone.
    """
    b, hq, d = q.shape
    hkv = k.shape[2]
    qf = q.float().reshape(b, hkv, hq // hkv, d)
    # ``matmul``, not ``einsum``: the same products, without einsum's per-call planning on the host
    logits = torch.matmul(qf, k.float().permute(0, 2, 3, 1)).reshape(b, hq, -1) * scale
    return logits.masked_fill(~key_mask[:, None, :], float("-inf"))


def attention_logits_stacked(
    q: torch.Tensor, k: torch.Tensor, scales: list[float], key_mask: torch.Tensor | None
) -> torch.Tensor:
    """:func:`attention_logits_padded` of the same rows in ``L`` layers at once: ``q [L, B, Hq, D]`` on
    ``k [L, B, S, Hkv, D]`` with layer ``l``'s ``scales[l]``, keys hidden by ``key_mask [B, S]`` (the
    same in every layer; ``None``: none). Returns fp32 ``[L, B, Hq, S]``."""
    n, b, hq, d = q.shape
    s, hkv = k.shape[2], k.shape[3]
    logits = torch.matmul(q.float().view(n, b, hkv, hq // hkv, d), k.float().permute(0, 1, 3, 4, 2))
    if len(set(scales)) == 1:
        logits = logits * scales[0]
    else:
        logits = logits * torch.tensor(scales, device=q.device).view(n, 1, 1, 1, 1)
    logits = logits.view(n, b, hq, s)
    if key_mask is None:
        return logits
    return logits.masked_fill(~key_mask[None, :, None, :], float("-inf"))


def attention_probs_padded(
    q: torch.Tensor, k: torch.Tensor, scale: float, key_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 ``lse [B, Hq]`` and probabilities ``[B, Hq, S]`` of :func:`attention_logits_padded`."""
    logits = attention_logits_padded(q, k, scale, key_mask)
    lse = torch.logsumexp(logits, dim=-1)
    return lse, torch.exp(logits - lse[..., None])


def attention_rows_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor,
    sink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_rows` for ``B`` single-query rows at once over padded K/V ``[B, S, Hkv, D]``.

    ``key_mask [B, S]`` (bool): the keys each row attends to (its causal length and any key mask).
    ``sink [B, Hq]`` as in :func:`attention_rows`. Returns ``out [B, Hq, D]`` (input dtype), the fp32
    ``lse [B, Hq]`` and the plain row's probabilities ``[B, Hq, S]`` (zero on hidden keys).
    """
    b, hq, d = q.shape
    hkv = k.shape[2]
    lse, probs = attention_probs_padded(q, k, scale, key_mask)
    weights = probs
    if sink is not None:
        total = torch.logaddexp(lse, sink.float())
        weights = probs * torch.exp(lse - total)[..., None]
    w = weights.reshape(b, hkv, hq // hkv, -1)
    out = torch.matmul(w, v.float().permute(0, 2, 1, 3)).reshape(b, hq, d)  # as einsum, with no planning
    return out.to(q.dtype), lse, probs
