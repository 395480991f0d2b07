# Slow reference for the tests and scripts/bench_calib_speed.py: llmprune/sparsity/sparsegpt.py as of b41ca56,
# verbatim but for absolute imports. Do not optimise or fix it: the fast code is checked against it.
"""SparseGPT (Frantar & Alistarh, 2023): mask selection with optimal-brain-surgeon weight reconstruction.

For one linear layer with calibration inputs ``X`` (tokens x in), the layer-wise objective is
``||W X^T - Ŵ X^T||^2`` whose Hessian w.r.t. each output row is ``H = 2 X^T X``. Columns (input features)
are processed left to right; pruning column ``j`` of a row and compensating the remaining columns with the
OBS update ``δ = -(w_j / [H^-1]_jj) [H^-1]_{j,j:}`` needs the rows of ``H^-1`` restricted to the not yet
processed columns, which are exactly the rows of the upper Cholesky factor of ``H^-1``. Columns are taken
in blocks (lazy batch updates); the mask of a block is chosen when the block starts (adaptive mask
selection), for N:M every ``m`` columns.

Everything runs in float64 on CPU (float32 on GPU) with dampening ``λ = percdamp * mean(diag H)``.

Example::

    acc = HessianAccumulator(in_features)
    for x in inputs: acc.update(x)
    new_w, keep = sparsegpt_prune(layer.weight, acc.hessian(), sparsity=0.5)
"""

from __future__ import annotations

import torch

from llmprune.sparsity.masks import _lowest, check_nm, num_pruned

__all__ = ["HessianAccumulator", "sparsegpt_prune", "inverse_hessian_cholesky"]


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over all ``N`` calibration tokens of one layer's input."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or (torch.float32 if device.type == "cuda" else torch.float64)
        self.H = torch.zeros(in_features, in_features, device=device, dtype=self.dtype)
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.H.device, self.dtype)
        n = x.shape[0]
        if n == 0:
            return
        total = self.count + n
        self.H.mul_(self.count / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.count = total

    def all_reduce(self) -> None:
        """Combine the running means of all processes (``accelerate launch``) into the mean over all tokens."""
        from llmprune.calibration.calibrate import all_reduce_sum, world

        if world()[1] == 1:
            return
        weighted, count = all_reduce_sum(self.H * self.count, torch.tensor([float(self.count)], dtype=torch.float64,
                                                                            device=self.H.device))
        self.count = int(count.item())
        self.H = weighted / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("HessianAccumulator saw no inputs")
        return self.H


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (``U^T U = (H + λI)^-1``), raising λ tenfold on failure."""
    H = H.clone()
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean()) if diag.numel() else 1.0
    if not mean_diag > 0:
        mean_diag = 1.0
    damp = percdamp * mean_diag
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U
        damp *= 10.0
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even after dampening; "
                       "use more calibration samples or a larger percdamp")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[out, in]`` given the Hessian ``H`` ``[in, in]``; returns ``(new_weight, keep_mask)``.

    Unstructured: exactly ``num_pruned(out*in, sparsity)`` weights are pruned, spread over column blocks
    by cumulative rounding; within a block the lowest ``w^2 / [U]_jj^2`` (OBS saliency) are pruned
    across all rows. N:M (``nm=(n, m)``): in every group of ``m`` columns each row keeps ``n``.
    ``new_weight`` has ``weight``'s dtype/device and exact zeros where ``keep_mask`` is False.
    """
    rows, cols = weight.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={cols}")
    if nm is not None:
        check_nm(*nm, in_features=cols)
        if blocksize % nm[1]:
            blocksize = max(nm[1], blocksize - blocksize % nm[1])
    else:
        num_pruned(1, sparsity)  # validates the range
    work_dtype = H.dtype if H.dtype in (torch.float32, torch.float64) else torch.float32
    H = H.to(work_dtype).clone()
    W = weight.detach().to(H.device, work_dtype).clone()

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = inverse_hessian_cholesky(H, percdamp)

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    total_prune = 0 if nm is not None else num_pruned(rows * cols, sparsity)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # cumulative rounding keeps the layer total exact whatever the block count
            k = round(total_prune * i2 / cols) - round(total_prune * i1 / cols)
            saliency = (W1 ** 2 / d.reshape(1, -1) ** 2).reshape(1, -1)
            prune1 = _lowest(saliency, k).reshape(rows, count)
        scale = prune1.to(W1.dtype) / d.reshape(1, -1)  # err_j = w_j / U_jj where pruned, else 0
        for j in range(count):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                sal = W1[:, j:j + m] ** 2 / d[j:j + m].reshape(1, -1) ** 2
                prune1[:, j:j + m] = _lowest(sal, m - n)
                scale[:, j:j + m] = prune1[:, j:j + m].to(W1.dtype) / d[j:j + m].reshape(1, -1)
            err = W1[:, j] * scale[:, j]
            Err1[:, j] = err
            if j + 1 < count:
                W1[:, j + 1:].addr_(err, U1[j, j + 1:], alpha=-1.0)
        W[:, i1:i2] = W1.masked_fill(prune1, 0.0)
        keep[:, i1:i2] = ~prune1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W.masked_fill_(~keep, 0.0)
    return W.to(weight.device, weight.dtype), keep.to(weight.device)
