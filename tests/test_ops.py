"""Shared tensor operations against independent computations: the Gaussian blur of IG's blurred
baseline, the occlusion / superpixel blur fill and the RISE insertion substrate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from xaicli.ops import gaussian_blur


def dense_blur(img: np.ndarray, sigma: float, radius: int, pad: str) -> np.ndarray:
    """(H, W) blurred by the full 2-D kernel exp(-(i^2 + j^2) / 2 sigma^2) / sum, |i|, |j| <= radius,
    by direct correlation over the padded image (edge values repeated, or zeros)."""
    i = np.arange(-radius, radius + 1, dtype=np.float64)
    k2 = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * sigma**2))
    k2 /= k2.sum()
    padded = np.pad(img, radius, mode="edge" if pad == "replicate" else "constant")
    windows = sliding_window_view(padded, k2.shape)
    return (windows * k2).sum((-2, -1))


# The taps are computed in float32 (then cast to the input's dtype), so even float64 inputs agree
# with a float64 reference to about 1e-7 only; a wrong kernel, radius or padding is off by 1e-2 or more.
TOL = 1e-6


def images(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, 19, 26, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("fold_channels", [False, True])
@pytest.mark.parametrize(("sigma", "radius", "pad"), [
    (1.0, None, "replicate"), (2.3, None, "replicate"), (0.2, None, "replicate"), (5.0, 5, "zero"), (1.5, 7, "zero"),
])
def test_blur_equals_the_dense_2d_kernel(sigma, radius, pad, fold_channels) -> None:
    x = images()
    ours = gaussian_blur(x, sigma, radius, pad, fold_channels)
    r = radius if radius is not None else max(1, math.ceil(3 * sigma))
    assert ours.shape == x.shape
    for b in range(2):
        for c in range(3):
            np.testing.assert_allclose(ours[b, c].numpy(), dense_blur(x[b, c].numpy(), sigma, r, pad),
                                       rtol=0, atol=TOL)


@pytest.mark.parametrize("pad", ["replicate", "zero"])
def test_blur_matches_scipy(pad) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = images()
    sigma, radius = 1.7, 6
    ours = gaussian_blur(x, sigma, radius, pad)
    mode = "nearest" if pad == "replicate" else "constant"
    ref = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, cval=0.0,
                                  truncate=radius / sigma)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=TOL)


def test_blur_matches_opencv_with_zero_padding() -> None:
    import cv2

    img = np.random.default_rng(0).normal(size=(20, 24)).astype(np.float32)
    k1 = cv2.getGaussianKernel(11, 5.0)
    ref = cv2.filter2D(img, -1, k1 @ k1.T, borderType=cv2.BORDER_CONSTANT)
    ours = gaussian_blur(torch.from_numpy(img)[None, None].expand(1, 3, 20, 24), 5.0, radius=5, pad="zero")
    for c in range(3):
        np.testing.assert_allclose(ours[0, c].numpy(), ref, atol=1e-5)


def test_blur_keeps_constants_and_dtype_and_sigma_zero_is_identity() -> None:
    x = torch.full((1, 3, 9, 9), 0.7)
    out = gaussian_blur(x, 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x)  # replicate: a constant image stays constant
    x = images()
    assert gaussian_blur(x, 0.0) is x
