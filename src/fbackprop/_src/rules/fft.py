"""``fft``: its VJP and JVP (the transform is linear), with the conventions of
:mod:`.linalg`.
"""

from __future__ import annotations

import math
import numpy as np
from jax import lax

from ..registry import defjvp_linear, defvjp


# ------------------------------------------------------------------------- fft
# The FFT is linear. Under the bilinear pairing the DFT matrix is symmetric, so
# FFT and IFFT are their own transposes. RFFT keeps the first N//2 + 1 outputs
# of a real input's FFT: its transpose is Re(F^T ct) = N * IRFFT(conj(ct) / c),
# where c = 2 for the bins IRFFT counts twice (all but DC and, for even N,
# Nyquist) and 1 otherwise. IRFFT (a Hermitian extension then an IFFT) has the
# transpose conj(c * RFFT(ct) / N). N is the product of fft_lengths.
def _fft(x, fft_type, fft_lengths):
    return lax.fft_p.bind(x, fft_type=fft_type, fft_lengths=tuple(fft_lengths))


def _hermitian_counts(fft_lengths, size, dtype):
    counts = np.full((size,), 2.0)
    counts[0] = 1.0
    if fft_lengths[-1] % 2 == 0:
        counts[-1] = 1.0
    return counts.astype(dtype)


def _fft_vjp(ct, out, x, *, fft_type, fft_lengths):
    kind = lax.FftType(fft_type)
    if kind in (lax.FftType.FFT, lax.FftType.IFFT):
        return _fft(ct, kind, fft_lengths)
    n_total = math.prod(fft_lengths)
    if kind == lax.FftType.RFFT:
        counts = _hermitian_counts(fft_lengths, ct.shape[-1], ct.dtype)
        ct_x = _fft(lax.conj(ct) / counts, lax.FftType.IRFFT, fft_lengths)
        return ct_x * np.array(n_total, x.dtype)
    # IRFFT
    spectrum = _fft(ct, lax.FftType.RFFT, fft_lengths)
    counts = _hermitian_counts(fft_lengths, spectrum.shape[-1], spectrum.dtype)
    return lax.conj(spectrum * (counts / n_total).astype(spectrum.dtype))


defvjp(lax.fft_p, _fft_vjp)
defjvp_linear(lax.fft_p)
