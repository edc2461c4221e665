"""Orthonormal 2-D discrete wavelet transform with periodic extension, in torch.

`dwt2` splits each (H, W) image into four (H/2, W/2) bands and `idwt2` puts them back together.
The results equal `pywt.dwt2(x, wavelet, mode="periodization")` and `pywt.idwt2(...)`: the filters
come from pywavelets and the sample alignment is the one pywt uses.

With an orthogonal wavelet and periodic extension the analysis is an orthogonal linear map, so the
synthesis is its transpose: `idwt2` is the adjoint of `dwt2` (a transposed convolution followed by
folding the wrapped-around border back onto the image), and `dwt2(idwt2(b)) == b` exactly.

Band order along the band axis, matching pywt's `(cA, (cH, cV, cD))`:

    0  LL  low-pass along H and W                        (pywt cA)
    1  LH  high-pass along H, low-pass along W           (pywt cH, horizontal edges)
    2  HL  low-pass along H, high-pass along W           (pywt cV, vertical edges)
    3  HH  high-pass along both                          (pywt cD, diagonal detail)
"""

from __future__ import annotations

import functools

import numpy as np
import pywt
import torch
import torch.nn.functional as F

# A constant image c has LL band LOW_BAND_GAIN * c: every orthonormal low-pass filter sums to √2, and
# the 2-D low band applies it along both axes. Conversely idwt2 of (LOW_BAND_GAIN * c, 0, 0, 0) is c.
LOW_BAND_GAIN = 2.0

# How far a filter bank may be from orthonormal (float64 round-off in pywt's tables is ~1e-12).
ORTHONORMALITY_TOLERANCE = 1e-9


@functools.lru_cache(maxsize=None)
def orthonormal_filters(wavelet: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The analysis filters `(dec_lo, dec_hi)` of an orthonormal pywt wavelet, checked.

    Raises ValueError for a name pywt does not know as a discrete wavelet, for a wavelet that is not
    orthogonal (biorthogonal families), and for one whose filters are only approximately orthonormal
    (pywt's 'dmey' is a truncated FIR approximation: perfect reconstruction would not hold).
    """
    if wavelet not in pywt.wavelist(kind="discrete"):
        raise ValueError(
            f"unknown wavelet {wavelet!r}: expected a discrete wavelet name from "
            "pywt.wavelist(kind='discrete'), e.g. 'haar', 'db2', 'db4', 'sym4', 'coif1'"
        )
    info = pywt.Wavelet(wavelet)
    if not info.orthogonal:
        raise ValueError(
            f"wavelet {wavelet!r} is not orthogonal (family {info.family_name!r}); use an orthogonal "
            "one such as 'haar', 'dbN', 'symN' or 'coifN'"
        )
    low, high = np.asarray(info.dec_lo, dtype=np.float64), np.asarray(info.dec_hi, dtype=np.float64)
    # Orthonormality of a two-channel filter bank: each filter has unit energy and is orthogonal to
    # every non-zero even shift of itself, and the two filters are orthogonal at every even shift.
    lags = np.arange(-(len(low) - 1), len(low))
    worst = 0.0
    for first, second, energy in ((low, low, 1.0), (high, high, 1.0), (low, high, 0.0)):
        correlation = np.correlate(first, second, mode="full")  # indexed by `lags`
        expected = np.where(lags == 0, energy, 0.0)
        worst = max(worst, float(np.abs(correlation - expected)[lags % 2 == 0].max()))
    if worst > ORTHONORMALITY_TOLERANCE:
        raise ValueError(
            f"wavelet {wavelet!r} has filters that are only approximately orthonormal (error {worst:.2g}); "
            "use an exactly orthogonal one such as 'haar', 'dbN', 'symN' or 'coifN'"
        )
    return tuple(low.tolist()), tuple(high.tolist())


@functools.lru_cache(maxsize=None)
def _filter_bank(wavelet: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The four separable 2-D analysis kernels, shaped (4, 1, F, F) for a strided conv2d.

    conv2d correlates, pywt convolves: the 1-D filters are flipped. Built outside inference mode so
    that a cached kernel first made under `torch.inference_mode()` can still be saved for backward.
    """
    low, high = orthonormal_filters(wavelet)
    with torch.inference_mode(False):
        low_t = torch.tensor(low, dtype=torch.float64).flip(0)
        high_t = torch.tensor(high, dtype=torch.float64).flip(0)
        along_h_then_w = [(low_t, low_t), (high_t, low_t), (low_t, high_t), (high_t, high_t)]
        kernels = torch.stack([torch.outer(filter_h, filter_w) for filter_h, filter_w in along_h_then_w])
        return kernels.unsqueeze(1).to(dtype=dtype, device=device)  # (4, 1, F, F)


def _periodic_indices(size: int, border: int, device: torch.device) -> torch.Tensor:
    """Indices into a length-`size` axis for the periodically extended axis [-border, size + border)."""
    return torch.arange(-border, size + border, device=device) % size


def _check_floating(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


def dwt2(x: torch.Tensor, wavelet: str) -> torch.Tensor:
    """One level of the 2-D orthonormal DWT over the last two axes, periodic extension.

    x: (B, C, H, W) with even H and W  ->  (B, C, 4, H/2, W/2), bands [LL, LH, HL, HH].
    """
    _check_floating(x, "dwt2 input")
    if x.dim() != 4:
        raise ValueError(f"dwt2 expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if height % 2 or width % 2 or height == 0 or width == 0:
        raise ValueError(f"dwt2 needs even, non-zero height and width, got H={height}, W={width}")
    kernels = _filter_bank(wavelet, x.dtype, x.device)  # (4, 1, F, F)
    # pywt's alignment: output k of a length-F filter draws on samples 2k + 1 - F/2 ... 2k + F/2,
    # so the axis is extended periodically by F/2 - 1 samples on each side.
    border = kernels.shape[-1] // 2 - 1
    images = x.reshape(batch * channels, 1, height, width)
    if border:
        images = images.index_select(2, _periodic_indices(height, border, x.device))
        images = images.index_select(3, _periodic_indices(width, border, x.device))
    bands = F.conv2d(images, kernels, stride=2)  # (B·C, 4, H/2, W/2)
    return bands.reshape(batch, channels, 4, height // 2, width // 2)


def idwt2(bands: torch.Tensor, wavelet: str) -> torch.Tensor:
    """Inverse of `dwt2`: (B, C, 4, h, w) bands [LL, LH, HL, HH]  ->  (B, C, 2h, 2w)."""
    _check_floating(bands, "idwt2 input")
    if bands.dim() != 5 or bands.shape[2] != 4:
        raise ValueError(f"idwt2 expects bands shaped (B, C, 4, h, w), got shape {tuple(bands.shape)}")
    batch, channels, _, band_height, band_width = bands.shape
    if band_height == 0 or band_width == 0:
        raise ValueError(f"idwt2 needs non-empty bands, got h={band_height}, w={band_width}")
    height, width = 2 * band_height, 2 * band_width
    kernels = _filter_bank(wavelet, bands.dtype, bands.device)  # (4, 1, F, F)
    border = kernels.shape[-1] // 2 - 1
    # Transpose of dwt2: the transposed strided convolution gives the periodically extended image,
    # whose wrapped-around borders are then added back onto the samples they are copies of.
    flat_bands = bands.reshape(batch * channels, 4, band_height, band_width)
    image = F.conv_transpose2d(flat_bands, kernels, stride=2)  # (B·C, 1, H + 2·border, W + 2·border)
    if border:
        rows = _periodic_indices(height, border, bands.device)
        columns = _periodic_indices(width, border, bands.device)
        folded_rows = image.new_zeros(batch * channels, 1, height, image.shape[3]).index_add(2, rows, image)
        image = image.new_zeros(batch * channels, 1, height, width).index_add(3, columns, folded_rows)
    return image.reshape(batch, channels, height, width)
