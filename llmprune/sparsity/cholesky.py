"""The damped reverse-Cholesky factorisation of a calibration Hessian that SparseGPT's column pass reads.

With ``H + λI = V V^T`` (``λ = percdamp * mean(diag H)``, raised tenfold while not positive definite), ``V``
upper triangular is the Cholesky factor of ``H + λI`` with rows and columns reversed, and ``V^-1`` is the upper
Cholesky factor of ``(H + λI)^-1`` (:func:`inverse_hessian_cholesky`), the rows SparseGPT's OBS updates need.

Two ways to get ``V``:

- :func:`_damped_reverse_cholesky`: one LAPACK call on a flipped copy of ``H`` (fast for narrow Hessians; about
  ``2 n^2`` values beyond ``H``);
- :func:`_reverse_cholesky_`: blocked and in place, in ``H``'s upper triangle (no full-size copy), for wide ones.

and the helpers that turn ``H``'s memory into the column pass's factor: :func:`_upper` (the upper triangle in
another dtype, built block by block) and :func:`_upper_in_place` (a float32 factor written over the float64
``H`` it is read from, with the rest of that memory handed back for the pass's work matrices).
"""

from __future__ import annotations

import torch

__all__ = ["inverse_hessian_cholesky"]


def _damped_reverse_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6,
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Upper triangular ``V`` with ``V V^T = H + λI`` (``λ = percdamp * mean diag``, raised tenfold on failure),
    in new memory (``H`` is left as it is).

    ``V`` is the lower Cholesky factor of ``H + λI`` with rows and columns reversed, taken with rows and
    columns reversed again; ``V^-1`` is then the upper Cholesky factor of ``(H + λI)^-1`` (both unique).
    One LAPACK call on a flipped copy (it reads that copy's lower triangle: ``H``'s upper one), in ``H``'s
    precision; ``dtype``: that of the returned ``V`` (cast before the final reversal, which is then
    cheaper). Needs about ``2 n^2`` values beyond ``H``: :func:`_reverse_cholesky_` is the in-place,
    blocked factorisation for wide Hessians.
    """
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean()) if diag.numel() else 1.0
    if not mean_diag > 0:
        mean_diag = 1.0
    damp = percdamp * mean_diag
    flipped = H.flip(0, 1)  # a copy, dampened in place below
    added = 0.0
    for _ in range(max_tries):
        torch.diagonal(flipped).add_(damp - added)
        added = damp
        L, info = torch.linalg.cholesky_ex(flipped)
        # a non-finite entry of H spreads into later diagonal entries, so checking the diagonal is enough
        if int(info) == 0 and bool(torch.isfinite(torch.diagonal(L)).all()):
            return (L if dtype is None else L.to(dtype)).flip(0, 1)
        damp *= 10.0
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even after dampening; "
                       "use more calibration samples or a larger percdamp")


def _reverse_cholesky_(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6,
                       block: int | None = None) -> None:
    """In place: ``H``'s upper triangle (diagonal included) becomes ``V`` with ``V V^T = H + λI``, ``V`` upper
    triangular (``λ = percdamp * mean diag``, raised tenfold up to ``max_tries`` times while ``H + λI`` is
    not positive definite); the strictly lower triangle then holds ``H``'s upper triangle mirrored (what a
    failed try restores ``H`` from). Raises ``RuntimeError`` with ``H`` restored (symmetrised) when every try
    fails.

    Blocked, from the bottom-right: with ``H = [[A, B], [B^T, D]]`` (``D`` the last ``block`` rows and
    columns), ``V = [[V11, V12], [0, V22]]`` with ``V22`` the reverse Cholesky factor of ``D`` (LAPACK on a
    flipped copy of the small block), ``V12 = B V22^-T`` and ``V11`` that of ``A - V12 V12^T``, updated
    block by block on the upper triangle only. Only the ``H`` given is written: no full-size copy of it.
    """
    n = H.shape[0]
    block = block or _FACTOR_BLOCK
    _mirror(H, block, upper_to_lower=True)
    diag = torch.diagonal(H)
    original = diag.clone()
    mean_diag = float(original.mean()) if n else 1.0
    if not mean_diag > 0:
        mean_diag = 1.0
    damp = percdamp * mean_diag
    for attempt in range(max_tries):
        if attempt:  # the failed try overwrote part of the upper triangle: H again from its lower one
            _mirror(H, block, upper_to_lower=False)
        torch.add(original, damp, out=diag)
        if _factor_blocks(H, block):
            return
        damp *= 10.0
    _mirror(H, block, upper_to_lower=False)
    diag.copy_(original)
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even after dampening; "
                       "use more calibration samples or a larger percdamp")


#: block width of :func:`_reverse_cholesky_` (measured: 512 about as fast as LAPACK's factorisation at 8192)
_FACTOR_BLOCK = 512


def _bounds(n: int, block: int) -> list[tuple[int, int]]:
    return [(i, min(i + block, n)) for i in range(0, n, block)]


def _mirror(H: torch.Tensor, block: int, upper_to_lower: bool) -> None:
    """Copy one strict triangle of square ``H`` onto the other, block by block (diagonal unchanged)."""
    bounds = _bounds(H.shape[0], block)
    for r, (r0, r1) in enumerate(bounds):
        for c0, c1 in bounds[r:]:
            up, low = H[r0:r1, c0:c1], H[c0:c1, r0:r1]
            if c0 > r0:
                (low if upper_to_lower else up).copy_((up if upper_to_lower else low).t())
            else:  # diagonal block: its own strict triangles
                src = up.triu(1) if upper_to_lower else up.tril(-1)
                up.copy_(src + src.t() + torch.diag_embed(torch.diagonal(up)))


def _factor_blocks(H: torch.Tensor, block: int) -> bool:
    """One try of :func:`_reverse_cholesky_` on the already dampened ``H``; False when a diagonal block is
    not positive definite (a non-finite entry spreads into a later diagonal block, so checking those is
    enough)."""
    bounds = _bounds(H.shape[0], block)
    for k in range(len(bounds) - 1, -1, -1):
        k0, k1 = bounds[k]
        Dk = H[k0:k1, k0:k1]
        # LAPACK reads the lower triangle of the flipped block, i.e. Dk's upper one (the current values)
        L, info = torch.linalg.cholesky_ex(Dk.flip(0, 1))
        if int(info) != 0 or not bool(torch.isfinite(torch.diagonal(L)).all()):
            return False
        V22 = L.flip(0, 1)  # upper triangular: exact zeros below the diagonal
        upper = torch.ones(k1 - k0, k1 - k0, dtype=torch.bool, device=H.device).triu_()
        torch.where(upper, V22, Dk, out=Dk)  # the strictly lower triangle is kept
        if k0 == 0:
            return True
        B = H[:k0, k0:k1]
        V12 = torch.linalg.solve_triangular(V22.t(), B, upper=False, left=False)  # V12 V22^T = B
        B.copy_(V12)
        for r0, r1 in bounds[:k]:  # A -= V12 V12^T on the upper triangle
            Vr = V12[r0:r1]
            H[r0:r1, r0:r1].sub_((Vr @ Vr.t()).triu_())  # zeros subtracted below the diagonal
            if r1 < k0:
                H[r0:r1, r1:k0].addmm_(Vr, V12[r1:k0].t(), alpha=-1.0)
    return True


def _upper(H: torch.Tensor, dtype: torch.dtype | None, consume: bool = False) -> torch.Tensor:
    """``H``'s upper triangle (zeros below) in ``dtype`` (``None``: ``H``'s own), in new memory built block
    of rows by block of rows (no full-size temporary); with ``consume`` and the same dtype, ``H`` itself
    (its lower triangle zeroed), else ``H`` is emptied (``set_()``) once copied."""
    dtype = dtype or H.dtype
    if dtype == H.dtype and consume:
        return H.triu_()
    V = _fill_upper(torch.empty(H.shape, dtype=dtype, device=H.device), H)
    if consume:
        H.set_()
    return V


def _fill_upper(V: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Writes ``H``'s upper triangle (zeros below) into ``V`` (its dtype), one block of rows at a time; each
    block of ``H`` is read (cast into a block-sized temporary) before ``V``'s rows are written, so ``V`` may
    overlap rows ``<=`` those of ``H`` it replaces (:func:`_upper_in_place`). Returns ``V``."""
    for r0, r1 in _bounds(H.shape[0], _FACTOR_BLOCK):
        block = H[r0:r1, r0:].to(V.dtype)
        V[r0:r1, :r0].zero_()
        V[r0:r1, r0:].copy_(block)
        V[r0:r1, r0:r1].triu_()
    return V


def _upper_in_place(H: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_upper` consuming ``H``, in ``H``'s own memory also when ``dtype`` is narrower (float32 from
    float64): returns ``(V, spare)``, ``spare`` the rest of ``H``'s memory as a flat ``dtype`` tensor (for
    the column pass's work matrices) or None; ``H`` is emptied (``set_()``; the memory lives on in ``V``).

    Row ``i`` of ``V`` is written over bytes that held rows ``<= i`` of ``H``, which :func:`_fill_upper`
    has read by then, so nothing unread is overwritten.
    """
    dtype = dtype or H.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == H.dtype or not H.is_contiguous() or H.element_size() % itemsize:
        return _upper(H, dtype, consume=True), None
    n = H.shape[0]
    flat = H.view(-1).view(dtype)  # H's bytes as dtype: (H.element_size() // itemsize) * n * n entries
    V = _fill_upper(flat[:n * n].view(n, n), H)
    spare = flat[n * n:]
    H.set_()
    return V, spare


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (``U^T U = (H + λI)^-1``), raising λ tenfold on failure."""
    V = _damped_reverse_cholesky(H, percdamp, max_tries)
    eye = torch.eye(V.shape[0], device=V.device, dtype=V.dtype)
    return torch.linalg.solve_triangular(V, eye, upper=True)
