"""Least-squares reconstruction of a projection whose input features were removed (pure functions).

When heads or neurons are removed, the projection that brings them back to the residual stream
(o_proj, down_proj and their fused or renamed equivalents: the adapter's ``output`` slot) loses input
columns. Instead of just slicing ``W[:, kept]``, the kept columns are refitted so the layer output on
calibration inputs changes as little as possible:

    W' = argmin_V  ||W X - V X_K||^2 + λ ||V - W_K||^2,    λ = percdamp * mean(diag G_KK)

with ``X`` the projection's inputs (features x tokens), ``G = X Xᵀ`` their Gram matrix and ``K`` the kept
features. The damping pulls towards the *original* kept weights (not towards zero), so any λ >= 0 gives an
output error no larger than the plain slice's, and λ -> 0 gives the ordinary least-squares solution. The
closed form is ``W' = W_K + W_R G_RK (G_KK + λI)^-1`` (``R``: removed features): the removed columns'
signal is re-expressed through the kept ones. Solves run in float64.

The same Gram matrix prices a removal before it is made: :func:`removal_error_curve` gives the output
error of removing the first ``k`` features of an ordering, for every ``k``, in one pass (the
optimal-brain-surgeon elimination with the Cholesky factor of the inverse Gram, as in SparseGPT). It drives
the ``error`` allocation (:mod:`llmprune.core.allocate`).

Example::

    G = X.T @ X                                     # X: [tokens, in]
    new_w = refit_columns(layer.weight, G, kept)     # [out, len(kept)]
    output_error(layer.weight, G, new_w, kept) <= output_error(layer.weight, G, layer.weight[:, kept], kept)
"""

from __future__ import annotations

import torch

__all__ = ["refit_columns", "output_error", "removal_error_curve", "augment_gram"]

#: solves and Gram products run in this precision (the Gram itself may be float32 on a GPU)
_SOLVE_DTYPE = torch.float64


def _damping(diag: torch.Tensor, percdamp: float) -> float:
    mean = float(diag.mean()) if diag.numel() else 0.0
    return percdamp * mean if mean > 0 else percdamp


def damped_cholesky(gram: torch.Tensor, lam: float, who: str = "reconstruction", overwrite: bool = False
                    ) -> torch.Tensor:
    """Lower Cholesky factor of ``gram + λI``, raising λ tenfold (from 1e-8 when it is 0) up to 5 times until the
    damped matrix is positive definite; a :class:`RuntimeError` naming ``who`` when it never is.

    λ is added to the diagonal of one private copy (``overwrite``: of ``gram`` itself, which the caller then no
    longer needs), never through an identity matrix: at a 70B model's FFN width each ``[n, n]`` float64 matrix
    is several GB, and the peak of a streamed run is this solve's working set."""
    a = gram if overwrite else gram.clone()
    diag = a.diagonal()
    added = 0.0
    for _ in range(6):
        diag.add_(lam - added)
        added = lam
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return chol
        del chol
        lam = lam * 10 if lam > 0 else 1e-8
    raise RuntimeError(f"{who}: the calibration Gram matrix is not positive definite even after damping; "
                       "use more calibration samples or a larger percdamp")


def _as_index(kept: torch.Tensor | list[int], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(kept, dtype=torch.long, device=device).reshape(-1)


@torch.no_grad()
def refit_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor | list[int],
                  percdamp: float = 0.01) -> torch.Tensor:
    """Refitted kept columns ``[out, len(kept)]`` of ``weight`` ``[out, in]`` (dtype of ``weight``).

    Args:
        gram: ``[in, in]`` Gram matrix ``Σ_t x_t x_tᵀ`` of the projection's inputs (any positive scale).
        kept: indices of the input features that remain, in the order the new weight stores them.
        percdamp: λ as a fraction of the mean diagonal of ``G_KK`` (0: plain least squares, which needs
            ``G_KK`` to be non-singular).
    """
    in_features = weight.shape[1]
    if gram.shape != (in_features, in_features):
        raise ValueError(f"Gram matrix {tuple(gram.shape)} does not match weight {tuple(weight.shape)}")
    dev = gram.device
    k = _as_index(kept, dev)
    drop = torch.ones(in_features, dtype=torch.bool, device=dev)
    drop[k] = False
    r = drop.nonzero().reshape(-1)
    w = weight.detach().to(dev, _SOLVE_DTYPE)
    if r.numel() == 0:
        return weight.detach()[:, k.to(weight.device)].clone()
    # blocks of the Gram cast one by one: no float64 copy of the whole [in, in] matrix
    g_kk = gram[k.unsqueeze(1), k].to(_SOLVE_DTYPE)
    lam = _damping(torch.diagonal(g_kk), percdamp)
    rhs = w.index_select(1, r) @ gram[r.unsqueeze(1), k].to(_SOLVE_DTYPE)  # W_R G_RK  [out, |K|]
    chol = damped_cholesky(g_kk, lam, overwrite=True)
    delta = torch.cholesky_solve(rhs.t(), chol).t()  # (G_KK + λI)^-1 is symmetric
    new = w.index_select(1, k) + delta
    return new.to(weight.device, weight.dtype)


@torch.no_grad()
def output_error(weight: torch.Tensor, gram: torch.Tensor, new_weight: torch.Tensor,
                 kept: torch.Tensor | list[int]) -> float:
    """``||W X - W' X_K||²`` from the Gram matrix: ``tr(D G Dᵀ)`` with ``D = W - scatter(W', K)``."""
    dev = gram.device
    k = _as_index(kept, dev)
    d = weight.detach().to(dev, _SOLVE_DTYPE).clone()
    d.index_add_(1, k, new_weight.detach().to(dev, _SOLVE_DTYPE), alpha=-1.0)
    return float(((d @ gram.to(_SOLVE_DTYPE)) * d).sum())


@torch.no_grad()
def removal_error_curve(weight: torch.Tensor, gram: torch.Tensor, order: torch.Tensor | list[int],
                        max_removed: int, refit: bool = True, percdamp: float = 0.01) -> torch.Tensor:
    """Output error of removing the first ``k`` features of ``order``, for ``k = 0 .. max_removed``.

    With ``refit`` the remaining features are refitted after each removal (the error of
    :func:`refit_columns` with the damped Gram ``G + λI``, which adds ``λ·||W_R||²`` plus the damping
    term to the plain error); without, the removed columns are simply dropped (``tr(W_R G_RR W_Rᵀ)``).
    Returns a float64 tensor of ``max_removed + 1`` non-decreasing values starting at 0.
    """
    dev = gram.device
    order = _as_index(order, dev)
    n = order.numel()
    max_removed = max(0, min(int(max_removed), n))
    g = gram.to(_SOLVE_DTYPE).index_select(0, order).index_select(1, order)
    w = weight.detach().to(dev, _SOLVE_DTYPE).index_select(1, order)
    errs = torch.zeros(max_removed + 1, dtype=_SOLVE_DTYPE, device=dev)
    if max_removed == 0:
        return errs.cpu()
    if not refit:
        # tr(W_R G_RR W_Rᵀ) for the leading R = first k: cumulative sums of the leading blocks of (WᵀW) ∘ G
        m = (w.t() @ w) * g
        m = m[:max_removed, :max_removed]
        lead = m.cumsum(0).cumsum(1).diagonal()
        errs[1:] = lead
        return errs.cpu()
    lam = _damping(torch.diagonal(g), percdamp)
    chol = damped_cholesky(g, lam)
    # Upper Cholesky factor of H^-1: row j holds column j's OBS update given only later columns remain.
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    block = 128
    total = 0.0
    for i1 in range(0, max_removed, block):
        i2 = min(i1 + block, max_removed)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            e = w1[:, j] / u[i1 + j, i1 + j]
            err1[:, j] = e
            total += float(e.pow(2).sum())
            errs[i1 + j + 1] = total
            w1[:, j + 1:] -= torch.outer(e, u[i1 + j, i1 + j + 1:i2])
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return errs.cpu()


def augment_gram(gram: torch.Tensor, feature_sum: torch.Tensor, count: float) -> torch.Tensor:
    """Gram matrix of ``[x; 1]`` from ``Σ x xᵀ``, ``Σ x`` and the token count (all with the same scale):
    a bias is then refitted as one more, always kept, input feature."""
    n = gram.shape[0]
    out = torch.empty(n + 1, n + 1, dtype=gram.dtype, device=gram.device)
    out[:n, :n] = gram
    s = feature_sum.to(gram.device, gram.dtype)
    out[:n, n] = s
    out[n, :n] = s
    out[n, n] = float(count)
    return out
