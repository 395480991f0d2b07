"""SparseGPT (Frantar & Alistarh, 2023): mask selection with optimal-brain-surgeon weight reconstruction.

For one linear layer with calibration inputs ``X`` (tokens x in), the layer-wise objective is
``||W X^T - Ŵ X^T||^2`` whose Hessian w.r.t. each output row is ``H = 2 X^T X``. Columns (input features)
are processed left to right; pruning column ``j`` of a row and compensating the remaining columns with the
OBS update ``δ = -(w_j / [H^-1]_jj) [H^-1]_{j,j:}`` needs the rows of ``H^-1`` restricted to the not yet
processed columns, which are the rows of the upper Cholesky factor ``U`` of ``H^-1``.

Here ``U`` is never formed: with ``H = V V^T`` (``V`` upper triangular, a Cholesky factorisation of ``H``
with rows and columns reversed), ``U = V^-1``, and the same pass reads (``Ṽ = V`` with each column divided by
its diagonal entry, ``Z = W - Ŵ`` the total change of a row)::

    c_j = w_j + sum_{i<j} Z_i Ṽ_ij        current value of column j once every earlier column is done
    Z_j = w_j  if pruned  else  w_j - c_j  (kept weights end at c_j; pruned ones at 0)

with saliency ``c_j^2 / U_jj^2 = (c_j V_jj)^2``. One factorisation replaces factorise-invert-factorise.
Columns are taken in blocks (lazy batch updates: a block's changes reach the later columns as one matrix
product), and each block in narrower sub-blocks the same way, so the column-by-column loop only touches a
thin slice. The mask of a block is chosen when the block starts (adaptive mask selection), for N:M when
each group of ``m`` columns is reached, on the values the column-by-column algorithm has at that point
(:func:`_seen`), so masks and weights are those of the unblocked algorithm up to rounding.

``H`` is accumulated and factorised in float64 on CPU (float32 on GPU); the column pass runs in float32
unless asked otherwise (``dtype``), with dampening ``λ = percdamp * mean(diag H)``. Linears
reading the same input (q/k/v, gate/up) share ``H`` and are solved as one stacked matrix
(:func:`sparsegpt_prune_group`); on CPU the column-by-column steps run in NumPy (cheaper calls).

The factorisation is in :mod:`.cholesky`. Memory: above ``_ONE_SHOT`` (2048) columns, where the copies would matter,
it is blocked and in place (:func:`.cholesky._reverse_cholesky_`, on ``H``'s upper triangle: no flipped copy, no
separate factor; narrower Hessians take one faster LAPACK call on a flipped copy), ``V`` in the column pass's
precision is built from it block by block, and ``Ṽ`` is made in ``V``'s own memory (the mask transforms need only
``Ṽ``: :func:`_view_transform`). The float32 ``V`` then takes the first half of the float64 ``H``'s memory and the
pass's work matrix ``C`` the second where it fits (:func:`.cholesky._upper_in_place`); a solve given
``overwrite_hessian=True`` works in ``H`` itself, so an 8192-wide float64 solve needs little beyond ``H`` (0.54 GB)
instead of about 2 GB.

Example::

    acc = HessianAccumulator(in_features)
    for x in inputs: acc.update(x)
    new_w, keep = sparsegpt_prune(layer.weight, acc.hessian(), sparsity=0.5)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..calibration.hessian import HessianAccumulator  # noqa: F401  (re-exported: llmprune.sparsity.HessianAccumulator)
from .cholesky import _damped_reverse_cholesky, _reverse_cholesky_, _upper_in_place
from .masks import _lowest, check_nm, num_pruned
from .registry import register_sparsity_method

__all__ = ["HessianAccumulator", "sparsegpt_prune", "sparsegpt_prune_group"]

#: the column-by-column loop touches a ``sub x rows`` slice with fewer elements than this (PyTorch's grain
#: size for parallel element-wise work), so its many small steps run inline instead of in a thread pool
_SERIAL_ELEMENTS = 32768

#: :func:`_kth_smallest` selects directly (`torch.kthvalue`) up to this many values: measured faster on CPU
#: than bracketing with a sample
_DIRECT_SELECT = 65536

#: Hessians up to this many columns are factorised by one LAPACK call on a flipped copy
#: (:func:`.cholesky._damped_reverse_cholesky`: measured 1.5-2x faster than in place at 256-768 columns, where
#: its copies are a few MB; 64 MB at 2048), wider ones in place (:func:`.cholesky._reverse_cholesky_`)
_ONE_SHOT = 2048


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype | None = torch.float32,
    overwrite_hessian: bool = False,
    overwrite_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` ``[out, in]`` given the Hessian ``H`` ``[in, in]``; returns ``(new_weight, keep_mask)``.

    Unstructured: exactly ``num_pruned(out*in, sparsity)`` weights are pruned, spread over column blocks
    by cumulative rounding; within a block the lowest ``w^2 / [U]_jj^2`` (OBS saliency) are pruned
    across all rows. N:M (``nm=(n, m)``): in every group of ``m`` columns each row keeps ``n``.
    ``new_weight`` has ``weight``'s dtype/device and exact zeros where ``keep_mask`` is False.

    ``dtype``: precision of the column pass (the factorisation of ``H`` runs in ``H``'s precision, float64
    on CPU); float32 (default) is faster on CPU and agrees with float64 on >= 99.9% of mask entries with
    reconstruction errors within 1% (tests/test_sparsegpt_precision.py); ``torch.float64`` or ``None``
    (``H``'s own precision) reproduces the float64 solve. ``overwrite_hessian``, ``overwrite_weights``: as
    :func:`sparsegpt_prune_group` (``H`` consumed, ``weight`` pruned in place; default: both left unchanged).
    """
    return sparsegpt_prune_group([weight], H, sparsity, nm=nm, blocksize=blocksize, percdamp=percdamp, dtype=dtype,
                                 overwrite_hessian=overwrite_hessian, overwrite_weights=overwrite_weights)[0]


@torch.no_grad()
def sparsegpt_prune_group(
    weights: Sequence[torch.Tensor],
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    dtype: torch.dtype | None = torch.float32,
    overwrite_hessian: bool = False,
    overwrite_weights: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sparsegpt_prune` of several ``[out_i, in]`` weights that read the same input (so share ``H``),
    solved as one: one factorisation and one column pass over the stacked rows.

    Rows are independent given ``H``; only the unstructured selection compares rows, and it is done per
    weight, so every ``(new_weight, keep_mask)`` is that of :func:`sparsegpt_prune` on its own.

    ``overwrite_hessian``: the solve may use ``H``'s memory: a wide ``H`` (over ``_ONE_SHOT`` columns) is
    factorised in place and the factor in ``dtype`` (and, where it fits, the pass's work matrix) take its
    place. ``H`` is then emptied (``H.set_()``: a 0-element tensor), or with ``dtype`` ``None`` / ``H``'s own,
    holds the solve's working data; a narrower one may have its dead inputs' diagonal set to 1. Its memory
    goes when the solve returns (:meth:`HessianAccumulator.release` hands it over). By default ``H`` is left
    unchanged (the solve works on a copy). ``overwrite_weights``: each pruned weight is written into its
    tensor of ``weights`` (returned as its ``new_weight``) instead of a new tensor. Results are the same
    either way.

    Example::

        [(q, q_keep), (k, k_keep), (v, v_keep)] = sparsegpt_prune_group([wq, wk, wv], H, 0.5)
        sparsegpt_prune_group([w_down], acc.release(), 0.5, overwrite_hessian=True)  # in H's memory
    """
    if not weights:
        return []
    cols = weights[0].shape[1]
    if any(w.dim() != 2 or w.shape[1] != cols for w in weights):
        raise ValueError(f"weights must be [out, {cols}] matrices: {[tuple(w.shape) for w in weights]}")
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features={cols}")
    if nm is not None:
        check_nm(*nm, in_features=cols)
        if blocksize % nm[1]:
            blocksize = max(nm[1], blocksize - blocksize % nm[1])
    else:
        num_pruned(1, sparsity)  # validates the range
    dead = torch.diagonal(H) == 0
    any_dead = bool(dead.any())
    in_place = cols > _ONE_SHOT  # wide: factorised in H's memory; narrow: faster on a flipped copy
    if H.dtype not in (torch.float32, torch.float64):
        H = H.float()  # a copy: the solve's own
    elif not overwrite_hessian and (in_place or any_dead):
        H = H.clone(memory_format=torch.contiguous_format)
    if any_dead:
        torch.diagonal(H)[dead] = 1.0
    # the factorisation in H's precision (float64 on CPU: float32 changes too many N:M choices); the factor
    # in the column pass's ``dtype``, wide ones in H's memory (H emptied: nothing else holds it)
    if in_place:
        _reverse_cholesky_(H, percdamp)
        Vs, spare = _upper_in_place(H, dtype)
    else:
        Vs, spare = _damped_reverse_cholesky(H, percdamp, dtype=dtype), None
    del H
    work_dtype = Vs.dtype
    sizes = [w.shape[0] for w in weights]
    rows = sum(sizes)
    # C: current values of the stacked rows, transposed [in, out] (a column of W is a contiguous row, so
    # column steps are contiguous); holds the pruned weight (zeros included) once every column is done. In
    # the rest of H's memory where it fits (float32 pass on a float64 H: half of it is free). The original
    # values W0 are read from ``weights`` block by block (:func:`_original`), never as a whole.
    C = spare[:cols * rows].view(cols, rows) if spare is not None and spare.numel() >= cols * rows else \
        torch.empty(cols, rows, dtype=work_dtype, device=Vs.device)
    for w, part in zip(weights, C.split(sizes, dim=1)):
        part.copy_(w.detach().t())
    if not any_dead:
        dead = None
    else:
        C[dead] = 0.0
    d = torch.diagonal(Vs).clone()
    # Vs[i, j] = V_ij / V_jj above the diagonal, 0 on and below it: carries column i's change into column j;
    # made in V's memory (V itself is not needed again: see _view_transform)
    Vs.div_(d)
    Vs.fill_diagonal_(0.0)

    prune = torch.empty(cols, rows, dtype=torch.bool, device=C.device)  # transposed; every entry is set
    totals = [0 if nm is not None else num_pruned(n * cols, sparsity) for n in sizes]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    sub = _sub_width(rows, 1 if nm is None else nm[1], blocksize)
    # N:M: every group's view transform at once (groups never straddle a sub-block or block)
    group_T = None if nm is None else _view_transform(_diagonal_blocks(Vs, nm[1]))
    tie_order = None if nm is None else _lower_first(nm[1], C.device)
    W0 = Z = seen = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W0 = _original(weights, sizes, i1, i2, dead, C)
        if nm is None:
            seen = C[i1:i2] if i1 == 0 else _seen(C[i1:i2], W0, _view_transform(Vs[i1:i2, i1:i2]))
            for r0, n, total in zip(starts, sizes, totals):  # each weight selects among its own rows
                # cumulative rounding keeps the layer total exact whatever the block count
                k = round(total * i2 / cols) - round(total * i1 / cols)
                _block_mask(seen[:, r0:r0 + n], d[i1:i2], k, out=prune[i1:i2, r0:r0 + n])
        groups = None if nm is None else group_T[i1 // nm[1]:i2 // nm[1]]
        Z = _solve_block(C[i1:i2], W0, Vs[i1:i2, i1:i2], d[i1:i2], prune[i1:i2], nm, sub, groups, tie_order)
        if i2 < cols:  # lazy batch update: the block's changes reach every later column at once
            C[i2:].addmm_(Vs[i1:i2, i2:].t(), Z)
    new_weights = [(w if overwrite_weights else torch.empty_like(w, memory_format=torch.contiguous_format))
                   .copy_(c.t()) for w, c in zip(weights, C.split(sizes, dim=1))]
    del C, Vs, spare, W0, Z, seen  # the masks are made without them
    results = []
    for w, new_weight, p in zip(weights, new_weights, prune.split(sizes, dim=1)):
        keep = torch.empty(w.shape, dtype=torch.bool, device=p.device)
        torch.logical_not(p.t(), out=keep)
        results.append((new_weight, keep.to(w.device)))
    return results


def _original(weights: Sequence[torch.Tensor], sizes: list[int], i1: int, i2: int, dead: torch.Tensor | None,
              like: torch.Tensor) -> torch.Tensor:
    """Original values of columns ``i1:i2`` of the stacked weights, transposed ``[i2 - i1, rows]`` in
    ``like``'s dtype and device (dead inputs zeroed): a block of the matrix ``C`` starts as."""
    out = torch.empty(i2 - i1, like.shape[1], dtype=like.dtype, device=like.device)
    for w, part in zip(weights, out.split(sizes, dim=1)):
        part.copy_(w.detach()[:, i1:i2].t())
    if dead is not None:
        out[dead[i1:i2]] = 0.0
    return out


def _sub_width(rows: int, m: int, blocksize: int) -> int:
    """Sub-block width: doubled from 8 while ``sub * rows`` stays under ``_SERIAL_ELEMENTS``, at most
    ``blocksize``, then rounded down to a multiple of ``m`` (at least ``m``)."""
    sub = 8
    while sub < blocksize and 2 * sub * rows < _SERIAL_ELEMENTS:
        sub *= 2
    sub = min(sub, blocksize)
    return max(m, sub - sub % m)


def _diagonal_blocks(V: torch.Tensor, m: int) -> torch.Tensor:
    """The ``[n/m, m, m]`` diagonal blocks of a square matrix."""
    g = V.shape[0] // m
    return V.reshape(g, m, g, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _view_transform(Vs: torch.Tensor) -> torch.Tensor:
    """``T = diag(D) D^-1`` for a diagonal block ``D`` of ``V`` (or a batch of them) given the same block of
    ``Vs`` (strictly upper, ``V_ij / V_jj``): see :func:`_seen`.

    ``D = (I + Vs) diag(D)`` (column ``j`` of ``D`` is that of ``I + Vs`` times ``D_jj``), so
    ``T = diag(D) diag(D)^-1 (I + Vs)^-1 = (I + Vs)^-1``: a unit triangular inverse, ``V`` not needed.
    """
    eye = torch.eye(Vs.shape[-1], dtype=Vs.dtype, device=Vs.device).expand(Vs.shape)
    return torch.linalg.solve_triangular(Vs, eye, upper=True, left=False, unitriangular=True)


def _seen(C: torch.Tensor, W0: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Values of a run of columns (rows of ``C``) as the original pass sees them when the run starts.

    There a column's current value holds the OBS updates of the columns already processed (``w - E U``),
    which differs from ``c`` here (``w + Z Ṽ`` over the same columns) until the run itself is processed;
    with ``D`` the run's diagonal block of ``V``, ``seen - w = (c - w) diag(D) D^-1``, so masks are chosen
    on exactly the values the original algorithm uses.
    """
    return torch.addmm(W0, T.t(), C - W0)


def _block_mask(seen: torch.Tensor, d: torch.Tensor, k: int, out: torch.Tensor) -> None:
    """Writes the transposed prune mask of the ``k`` lowest saliencies ``(w V_jj)^2`` of a block into ``out``.

    The ``k``-th value comes from a selection (``kthvalue``), not a sort; only when entries tie at it are
    they ranked as :func:`_lowest` ranks the ``[out, in]`` weight (row-major, lower index first).
    """
    saliency = (seen * d.reshape(-1, 1)).square_()
    n = saliency.numel()
    if k <= 0 or k >= n:
        out.fill_(k > 0)
        return
    torch.le(saliency, _kth_smallest(saliency.reshape(-1), k), out=out)
    if int(out.sum()) != k:  # ties at the k-th value (or NaN)
        flat = _lowest(saliency.t().reshape(1, -1), k)
        out.copy_(flat.reshape(saliency.shape[1], saliency.shape[0]).t())


def _kth_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """``torch.kthvalue(x, k).values`` of a 1-D tensor, exact: up to ``_DIRECT_SELECT`` values by
    ``torch.kthvalue``; more (a block has up to ~10^5) by NumPy's introselect on CPU, elsewhere among the
    few values a strided sample brackets it with (:func:`_kth_bracketed`)."""
    n = x.numel()
    if n <= _DIRECT_SELECT:
        return torch.kthvalue(x, k).values
    if x.device.type == "cpu":
        return torch.tensor(np.partition(x.detach().numpy(), k - 1)[k - 1], dtype=x.dtype)
    return _kth_bracketed(x, k)


def _kth_bracketed(x: torch.Tensor, k: int, sample: int = 2048) -> torch.Tensor:
    """``torch.kthvalue(x, k).values`` of a 1-D tensor, selected among the few values a strided sample
    brackets it with (a full selection copies and partitions all of ``x``).

    Falls back to the full selection when the bracket misses (never for non-NaN data of this size), so
    the value is always exact.
    """
    n = x.numel()
    if n <= 4 * sample:
        return torch.kthvalue(x, k).values
    probe = torch.sort(x[:: n // sample]).values
    pos = k * probe.numel() / n
    margin = 4 * (probe.numel() ** 0.5) + 8  # ~8 standard deviations of a sample quantile's rank
    lo = probe[max(int(pos - margin), 0)]
    hi = probe[min(int(pos + margin), probe.numel() - 1)]
    below = int(torch.lt(x, lo).sum())
    band = x[(x >= lo) & (x <= hi)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(x, k).values


def _lower_first(m: int, device: torch.device) -> torch.Tensor:
    """``[m, m, 1]`` tie order for :func:`_nm_prune`: entry ``[i, j]`` is ``i < j``."""
    return torch.ones(m, m, dtype=torch.bool, device=device).triu_(1).unsqueeze(-1)


def _nm_prune(saliency: torch.Tensor, k: int, lower_first: torch.Tensor) -> torch.Tensor:
    """Mask of the ``k`` lowest of each column of ``saliency`` ``[m, rows]`` (one N:M group, transposed).

    By rank rather than a sort: an entry's rank is the number of entries below it, ties counted for
    the lower index first (as :func:`_lowest`'s stable sort). Saliencies are assumed not NaN.
    """
    a, b = saliency.unsqueeze(1), saliency.unsqueeze(0)  # [i, j, row]: compare entry i with entry j
    rank = ((a < b) | ((a == b) & lower_first)).sum(0)
    return rank < k


def _solve_block(C: torch.Tensor, W0: torch.Tensor, Vs: torch.Tensor, d: torch.Tensor, prune: torch.Tensor,
                 nm: tuple[int, int] | None, sub: int, groups: torch.Tensor | None,
                 tie_order: torch.Tensor | None) -> torch.Tensor:
    """Process one column block (rows of ``C`` ``[count, rows]``, updated in place); returns its changes ``Z``.

    ``prune`` (transposed mask) is read for unstructured and written for N:M (``groups``: the view
    transforms of the block's m-groups; ``tie_order``: from :func:`_lower_first`). The block is taken ``sub`` columns at a time; a sub-block's
    changes reach the rest of the block with one matrix product.
    """
    count = C.shape[0]
    Z = torch.empty_like(C)
    solve = _solve_columns_cpu if C.device.type == "cpu" else _solve_columns
    for a in range(0, count, sub):
        b = min(a + sub, count)
        sub_groups = None if nm is None else groups[a // nm[1]:b // nm[1]]
        solve(C[a:b], W0[a:b], Vs[a:b, a:b], d[a:b], prune[a:b], Z[a:b], nm, sub_groups, tie_order)
        if b < count:
            C[b:].addmm_(Vs[a:b, b:].t(), Z[a:b])
    return Z


def _solve_columns(C: torch.Tensor, W0: torch.Tensor, Vs: torch.Tensor, d: torch.Tensor, prune: torch.Tensor,
                   Z: torch.Tensor, nm: tuple[int, int] | None, groups: torch.Tensor | None,
                   tie_order: torch.Tensor | None) -> None:
    """The column-by-column pass over a few columns, writing their changes ``Z = w - ŵ`` into ``Z``.

    Column ``j`` ends at ``c_j`` if kept and 0 if pruned (zeroed once the slice is done); its change reaches
    the later columns of the slice along row ``j`` of ``Vs`` (the rank-1 update of the original algorithm, on
    a thin slice; the zeros of ``Vs`` on and below the diagonal leave the finished columns as they are).
    N:M chooses each group's mask when the group is reached, on the values the original pass sees.
    """
    count = C.shape[0]
    keep = (~prune).to(C.dtype) if nm is None else torch.empty_like(C)
    c_rows, w_rows, keep_rows, z_rows, v_rows = C.unbind(0), W0.unbind(0), keep.unbind(0), Z.unbind(0), Vs.unbind(0)
    for j in range(count):
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            w = W0[j:j + m]
            # _seen as a broadcast sum: a matrix product this small still wakes the BLAS thread pool
            seen = w + (groups[j // m].unsqueeze(-1) * (C[j:j + m] - w).unsqueeze(1)).sum(0)
            group_prune = _nm_prune((seen * d[j:j + m].reshape(-1, 1)).square_(), m - n, tie_order)
            prune[j:j + m] = group_prune
            torch.logical_not(group_prune, out=keep[j:j + m])
        torch.addcmul(w_rows[j], c_rows[j], keep_rows[j], value=-1.0, out=z_rows[j])
        if j + 1 < count:
            C.addr_(v_rows[j], z_rows[j])
    C.masked_fill_(prune, 0.0)  # the slice is done: pruned weights end at 0


def _solve_columns_cpu(C: torch.Tensor, W0: torch.Tensor, Vs: torch.Tensor, d: torch.Tensor, prune: torch.Tensor,
                       Z: torch.Tensor, nm: tuple[int, int] | None, groups: torch.Tensor | None,
                       tie_order: torch.Tensor | None = None) -> None:
    """:func:`_solve_columns` on CPU, in NumPy on the same memory: the pass is thousands of tiny steps,
    and a NumPy call costs a fraction of a PyTorch op's dispatch (about 1 us against 5-10 us).

    Taken ``m`` columns at a time (N:M groups; 4 for unstructured): a chunk's current values receive the
    earlier chunks' changes in one product (left-looking), then its columns are solved one by one with
    rank-1 updates inside the chunk. Same arithmetic as :func:`_solve_columns` up to summation order.
    """
    lower_first = None if tie_order is None else tie_order.numpy()
    c, w, v, z, p = C.numpy(), W0.numpy(), Vs.numpy(), Z.numpy(), prune.numpy()
    count = c.shape[0]
    step = 4 if nm is None else nm[1]
    keep = (~p).astype(c.dtype) if nm is None else np.empty(c.shape, dtype=c.dtype)  # N:M: set per group
    vt = np.ascontiguousarray(v.T)  # vt[j, :j]: what earlier columns add to column j
    tmp = np.empty(c.shape[1], dtype=c.dtype)
    dd = None if nm is None else d.numpy().reshape(-1, 1)
    T = None if groups is None else groups.numpy()
    for g0 in range(0, count, step):
        g1 = min(g0 + step, count)
        if g0:
            c[g0:g1] += vt[g0:g1, :g0] @ z[:g0]
        if nm is not None:
            n, m = nm
            wg = w[g0:g1]
            seen = wg + T[g0 // m].T @ (c[g0:g1] - wg)  # see _seen
            saliency = np.square(seen * dd[g0:g1])
            # _nm_prune by rank (cheaper than an argsort along the short axis): entry j's rank counts the
            # entries below it, ties counted for the lower index first
            a, b = saliency[:, None], saliency[None]
            rank = ((a < b) | ((a == b) & lower_first)).sum(0)
            np.less(rank, m - n, out=p[g0:g1])
            np.logical_not(p[g0:g1], out=keep[g0:g1])
        for j in range(g0, g1):
            np.multiply(c[j], keep[j], out=tmp)
            np.subtract(w[j], tmp, out=z[j])
            if j + 1 < g1:
                c[j + 1:g1] += np.multiply.outer(v[j, j + 1:g1], z[j])
    c[p] = 0.0  # the slice is done: pruned weights end at 0


@torch.no_grad()
def _prune_group(weights: list[torch.Tensor], stats, sparsity: float, config) -> None:
    """The registered ``prune_group`` (``prune`` with one weight): one solve of the weights reading ``stats``'
    input, consuming its Hessian (``release()``: the solve works in its memory and frees it), written into them."""
    sparsegpt_prune_group(weights, stats.release(), sparsity, nm=config.nm, blocksize=config.blocksize,
                          percdamp=config.percdamp, overwrite_hessian=True, overwrite_weights=True)


def _prune(weight: torch.Tensor, stats, sparsity: float, config) -> None:
    """The registered ``prune``: :func:`_prune_group` of the one weight."""
    _prune_group([weight], stats, sparsity, config)


register_sparsity_method("sparsegpt", "OBS reconstruction of the kept weights", needs="hessian", prune=_prune,
                         prune_group=_prune_group)
