"""Earth mover's distance and the multi-patch EMD losses of METHOD.md.

All functions take probability distributions along the last dimension (10 ordered bins).
"""

from __future__ import annotations

import torch
from torch import Tensor


def emd(p: Tensor, q: Tensor, r: float = 2.0) -> Tensor:
    """``EMD_r(p, q) = ((1/N) * sum_k |F(k) - G(k)|^r)^(1/r)``, batched over leading dims.

    The 1/N sits inside the root (METHOD.md). Safe at ``p == q``: the root's gradient there is
    defined as 0 instead of inf/NaN (double ``where``, so no NaN leaks into the backward pass).
    """
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    cdf_diff = torch.cumsum(p - q, dim=-1)
    inner = cdf_diff.abs().pow(r).mean(dim=-1)
    if r == 1:
        return inner
    positive = inner > 0
    safe = torch.where(positive, inner, torch.ones_like(inner))
    return torch.where(positive, safe.pow(1.0 / r), torch.zeros_like(inner))


def _reduce(per_image: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def nima_loss(probs: Tensor, target: Tensor, r: float = 2.0, *, reduction: str = "mean") -> Tensor:
    """NIMA's training loss: the batch mean of ``EMD_r(target, probs)``; probs and target (B, N).

    ``reduction="none"`` gives the (B,) per-image losses instead of their mean.
    """
    return _reduce(emd(target, probs, r=r), reduction)


def patch_certainty(patch_emd: Tensor, *, k: float = 1.2, eps: float = 1e-6) -> Tensor:
    """``EMDc = max(eps, 1 - k * EMD)``: how sure a patch is, in [eps, 1]."""
    return torch.clamp(1.0 - k * patch_emd, min=eps)


def mpemd_loss(
    patch_probs: Tensor,
    target: Tensor,
    *,
    k: float = 1.2,
    gamma: float = 0.4,
    eps: float = 1e-6,
    adaptive: bool = True,
    detach_weight: bool = False,
    r: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Batch mean of MPEMD_ada (``adaptive=True``) or MPEMD_avg over |P| patches per image.

    ``reduction="none"`` gives the (B,) per-image values instead of their mean.

    ``patch_probs``: (B, P, N) patch distributions; ``target``: (B, N) ground truth.

        EMD_j  = EMD_2(p, p_hat_j);  EMDc_j = max(eps, 1 - k * EMD_j);  w_j = 1 - EMDc_j ** gamma
        MPEMD_avg = -(1/|P|) sum_j log EMDc_j;  MPEMD_ada = -(1/|P|) sum_j w_j log EMDc_j

    With ``detach_weight`` the weights ``w_j`` are constants for the backward pass (the authors'
    code lets gradients flow through them, our default too).
    """
    if patch_probs.dim() != 3 or target.dim() != 2 or patch_probs.shape[0] != target.shape[0]:
        raise ValueError(f"expected (B,P,N) and (B,N), got {tuple(patch_probs.shape)} and {tuple(target.shape)}")
    patch_emd = emd(target.unsqueeze(1).expand_as(patch_probs), patch_probs, r=r)  # (B, P)
    certainty = patch_certainty(patch_emd, k=k, eps=eps)
    log_certainty = torch.log(certainty)
    if adaptive:
        weight = 1.0 - certainty.pow(gamma)
        if detach_weight:
            weight = weight.detach()
        per_image = -(weight * log_certainty).mean(dim=1)
    else:
        per_image = -log_certainty.mean(dim=1)
    return _reduce(per_image, reduction)
