"""Threshold statistics of activation magnitudes: the ``s``-quantile of ``|x|`` over a stream of values.

- :class:`AbsHistogram`: a streamed histogram of ``|x|`` in log-spaced bins (``2**bits`` per octave, binned by
  the float32 bit pattern), fixed memory, every value counted; :meth:`AbsHistogram.threshold` interpolates within
  the quantile's bin (within 0.1% of the exact order statistics at the default 10 bits). What
  :func:`llmprune.sparsity.calibrate_activation_thresholds` uses.
  Tested against the exact order statistics of every value (``tests/teal_reference.py``).

Example::

    h = AbsHistogram()
    for x in inputs: h.update(x)
    t = h.threshold(0.4)        # a fraction 0.4 of the |x| seen is <= t
"""

from __future__ import annotations

import struct

import torch

from ..calibration.calibrate import CalibrationError

__all__ = ["AbsHistogram"]

#: histogram resolution: ``2**_HIST_BITS`` bins per octave, i.e. bins 0.1% wide relative to their values
_HIST_BITS = 10


class AbsHistogram:
    """Streamed histogram of ``|x|`` in ``2**bits`` log-spaced bins per octave; fixed memory, no sampling.

    Read as an integer, the bit pattern of a non-negative float32 grows with its value, and its top
    ``9 + bits`` bits (exponent and leading mantissa bits) number bins of relative width ``2**-bits``; so
    binning is an integer shift and a ``bincount``. Bin 0 (zeros and subnormals below ``2**(-126 - bits)``)
    reads as 0.
    """

    def __init__(self, bits: int = _HIST_BITS, device: torch.device | str | None = None):
        if not 0 <= bits <= 23:
            raise ValueError(f"bits={bits!r} must be in [0, 23]")
        self.shift = 23 - bits
        self.counts = torch.zeros(1 << (31 - self.shift), dtype=torch.int64, device=device)
        self.seen = 0

    def update(self, values: torch.Tensor) -> None:
        """Count ``|values|`` (any shape and float dtype)."""
        self.add(self.bin_counts(values), values.numel())

    def bin_counts(self, values: torch.Tensor) -> torch.Tensor:
        """Per-bin counts of ``|values|`` alone (to :meth:`add` to every histogram of the same values)."""
        a = values.detach().float().abs().reshape(-1)
        bins = a.view(torch.int32) >> self.shift  # sign bit cleared by abs: indices are non-negative
        return torch.bincount(bins, minlength=self.counts.numel())

    def add(self, counts: torch.Tensor, n: int) -> None:
        """Add per-bin counts of ``n`` values (from :meth:`bin_counts` of a histogram with the same bits)."""
        self.counts += counts.to(self.counts.device)
        self.seen += n

    def add_bins(self, bins: torch.Tensor, counts: torch.Tensor, n: int) -> None:
        """:meth:`add` with the counts given for ``bins`` only (the others are 0)."""
        self.counts.index_add_(0, bins.to(self.counts.device), counts.to(self.counts.device))
        self.seen += n

    def all_reduce(self) -> None:
        """Sum the counts of all processes (``accelerate launch``): the histogram of all their values."""
        from ..calibration.calibrate import all_reduce_sum, world

        if world()[1] == 1:
            return
        seen = torch.tensor([self.seen], dtype=torch.int64, device=self.counts.device)
        self.counts, seen = all_reduce_sum(self.counts, seen)
        self.seen = int(seen.item())

    def threshold(self, sparsity: float) -> float:
        """The exact quantile of every value counted: the midpoint of the ``k``-th and
        ``k+1``-th smallest (``k = round(sparsity * seen)``), each located to its bin and interpolated."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
        n = self.seen
        if n == 0:
            raise CalibrationError("no activation values to calibrate on")
        k = int(round(sparsity * n))
        if k <= 0:
            return 0.0
        cum = self.counts.cumsum(0)
        if k >= n:
            return self._order_statistic(n, cum)
        return (self._order_statistic(k, cum) + self._order_statistic(k + 1, cum)) / 2

    def _order_statistic(self, r: int, cum: torch.Tensor) -> float:
        """The ``r``-th smallest value (1-based), spreading a bin's values evenly over its range."""
        b = int(torch.searchsorted(cum, torch.tensor([r], dtype=cum.dtype, device=cum.device)))
        if b == 0:
            return 0.0
        lo, hi = _bits_to_float(b << self.shift), _bits_to_float((b + 1) << self.shift)
        if not hi > lo:  # the top bins hold inf and NaN
            return lo
        below = int(cum[b - 1])
        return lo + (hi - lo) * (r - below - 0.5) / int(self.counts[b])


def _bits_to_float(bits: int) -> float:
    """The float32 whose bit pattern is the non-negative integer ``bits`` (< 2**31)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]
