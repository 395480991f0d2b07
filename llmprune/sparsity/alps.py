"""ALPS (Meng et al., NeurIPS 2024): one-shot weight pruning by ADMM with a penalty schedule, then an
exact weight update on the chosen support.

For one linear layer with calibration Gram matrix ``H = X Xᵀ`` the layer-wise problem is

    min_Ŵ  tr((W - Ŵ) H (W - Ŵ)ᵀ)   subject to   Ŵ sparse (unstructured count or N:M).

ALPS splits it with ADMM into a smooth least-squares step and a projection onto the sparsity set:

    B <- (W H - V + ρ D)(H + ρI)⁻¹          (one eigendecomposition of H serves every ρ)
    D <- project(B + V/ρ)                    (keep the largest magnitudes; per row, layer or N:M group)
    V <- V + ρ (B - D)

ρ grows while the support still changes (faster the more it changes), which drives B and D together;
the loop stops once the support is stable. The support is then fixed and the weights on it are solved
exactly (conjugate gradient on the normal equations restricted to the support; the rows are independent
systems solved as one batch). Features are first scaled to unit diagonal of ``H`` (after damping by
``percdamp * mean(diag H)``), which makes magnitudes in the projection activation-aware, like Wanda's
``|W|·||X||``.

Everything runs in float64 on CPU (float32 on GPU).

Example::

    acc = HessianAccumulator(in_features); acc.update(x)
    new_w, keep = alps_prune(layer.weight, acc.hessian(), sparsity=0.7)
"""

from __future__ import annotations

import torch

from .masks import _lowest, check_nm, num_pruned
from .registry import register_sparsity_method

__all__ = ["alps_prune", "masked_least_squares"]


def _project(m: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per: str) -> torch.Tensor:
    """Keep-mask of the largest ``|m|``: ``nm`` groups, each row, or the whole matrix."""
    rows, cols = m.shape
    a = m.abs()
    if nm is not None:
        n, g = nm
        return ~_lowest(a.reshape(rows, cols // g, g), g - n).reshape(rows, cols)
    if per == "row":
        return ~_lowest(a, num_pruned(cols, sparsity))
    return ~_lowest(a.reshape(1, -1), num_pruned(rows * cols, sparsity)).reshape(rows, cols)


@torch.no_grad()
def masked_least_squares(weight: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, start: torch.Tensor | None = None,
                         iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """``argmin_B tr((W - B) H (W - B)ᵀ)`` with ``B`` zero outside ``keep``: batched conjugate gradient
    on ``(B H) ∘ keep = (W H) ∘ keep`` (every output row is its own system), warm-started at ``start``."""
    mask = keep.to(H.dtype)
    target = (weight @ H) * mask
    b = (start if start is not None else weight) * mask
    r = target - (b @ H) * mask
    p = r.clone()
    rr = (r * r).sum(1)
    stop = tol * tol * (target * target).sum(1).clamp_min(1e-30)
    for _ in range(iters):
        if bool((rr <= stop).all()):
            break
        hp = (p @ H) * mask
        alpha = rr / (p * hp).sum(1).clamp_min(1e-30)
        b = b + alpha[:, None] * p
        r = r - alpha[:, None] * hp
        rr_new = (r * r).sum(1)
        p = r + (rr_new / rr.clamp_min(1e-30))[:, None] * p
        rr = rr_new
    return b * mask


@torch.no_grad()
def alps_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    per: str = "layer",
    percdamp: float = 0.01,
    rho: float = 0.1,
    max_iter: int = 300,
    update_every: int = 3,
    cg_iters: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[out, in]`` given the Gram/Hessian ``H`` ``[in, in]``; returns ``(new_weight, keep)``.

    Args:
        sparsity: fraction of weights zeroed (exact count per ``per`` group; ignored for ``nm``).
        nm: ``(n, m)``: ``n`` kept in every ``m`` consecutive inputs of each row.
        per: unstructured comparison group, ``layer`` (the paper's choice) or ``row``.
        percdamp: dampening of ``H`` as a fraction of its mean diagonal.
        rho: initial ADMM penalty (in the unit-diagonal scaling).
        max_iter, update_every: ADMM iterations at most; ρ is adapted every ``update_every`` iterations.
        cg_iters: conjugate-gradient iterations of the final exact update on the support.
    """
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={cols}")
    if nm is not None:
        check_nm(*nm, in_features=cols)
    else:
        num_pruned(1, sparsity)  # validates the range
    if per not in ("row", "layer"):
        raise ValueError(f"per={per!r}; choose 'row' or 'layer'")
    dtype = H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32
    H = H.to(dtype).clone()
    W = weight.detach().to(H.device, dtype).clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    W[:, dead] = 0.0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    H += (percdamp * mean) * torch.eye(cols, dtype=dtype, device=H.device)
    H[dead, dead] = mean
    scale = torch.diagonal(H).sqrt()
    Hn = H / scale[:, None] / scale[None, :]
    Wn = W * scale[None, :]
    evals, Q = torch.linalg.eigh(Hn)
    WH = Wn @ Hn

    keep = _project(Wn, sparsity, nm, per)
    D = Wn * keep
    V = torch.zeros_like(Wn)
    B = Wn
    pruned_total = max(int((~keep).sum()), 1)
    checked = keep
    grown = False
    for it in range(1, max_iter + 1):
        B = ((WH - V + rho * D) @ Q) / (evals + rho)[None, :] @ Q.t()
        new_keep = _project(B + V / rho, sparsity, nm, per)
        D = (B + V / rho) * new_keep
        V = V + rho * (B - D)
        if it % update_every == 0:
            changed = int((new_keep != checked).sum()) / pruned_total
            checked = new_keep
            if changed > 0.1:
                rho *= 1.3
                grown = True
            elif changed > 0.005:
                rho *= 1.2
                grown = True
            elif changed > 0:
                rho *= 1.1
            elif grown:
                break  # support stable after the penalty took hold
            else:
                rho *= 1.1
            rho = min(rho, 1e6)
        keep = new_keep
    final = masked_least_squares(Wn, Hn, keep, start=D, iters=cg_iters)
    out = final / scale[None, :]
    out[:, dead] = 0.0
    return out.to(weight.device, weight.dtype), keep.to(weight.device)


@torch.no_grad()
def _prune(weight: torch.Tensor, stats, sparsity: float, config) -> None:
    """The registered ``prune``: :func:`alps_prune` (per layer) on ``stats.hessian()``, written into ``weight``."""
    new_w, _ = alps_prune(weight, stats.hessian(), sparsity, nm=config.nm, per="layer", percdamp=config.percdamp)
    weight.copy_(new_w)


register_sparsity_method("alps", "ADMM mask search then the exact least-squares update on the mask",
                         needs="hessian", prune=_prune)
