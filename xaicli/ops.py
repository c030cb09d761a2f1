"""Tensor operations that methods and metrics share. Pure functions on the device: no model, no
file, no configuration."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_blur(
    x: Tensor,
    sigma: float,
    radius: int | None = None,
    pad: Literal["replicate", "zero"] = "replicate",
    fold_channels: bool = False,
) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), each channel on its own, on the device.

    Taps: the Gaussian sampled at -radius..radius and normalised to sum 1; ``radius`` None is
    max(1, ceil(3 sigma)). ``pad``: ``replicate`` repeats the edge pixels, ``zero`` pads with 0 (in
    normalised space: the mean colour; RISE's insertion substrate). ``sigma`` <= 0 returns ``x``.

    ``fold_channels``: run the rows and columns as one-channel convolutions over B*C images instead
    of one grouped convolution. The same sums, yet not always the same bits: a grouped and a folded
    convolution agreed on every float32 CPU input tried but differ in the last bit in float64, and
    CUDA may pick different kernels for them. Callers keep the layout they have always used, so
    that their maps stay bit for bit the same (occlusion and superpixel fills fold).
    """
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma)) if radius is None else radius
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w) if fold_channels else x
    n = y.shape[1]
    rows, cols = k.view(1, 1, 1, -1).expand(n, 1, 1, -1), k.view(1, 1, -1, 1).expand(n, 1, -1, 1)
    if pad == "replicate":
        y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), rows, groups=n)
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), cols, groups=n)
    else:
        y = F.conv2d(y, rows, padding=(0, r), groups=n)
        y = F.conv2d(y, cols, padding=(r, 0), groups=n)
    return y.reshape(b, c, h, w)
