"""Similarity of two sets of maps, per image, as plain tensor functions on the device: Spearman
rank correlation (with average ranks for ties) and SSIM (Wang et al. 2004). The sanity test
(xaicli/sanity.py) compares the maps of a model with those of its randomised copies with them.

* ``spearman_abs`` - Spearman rank correlation of |map|; ``spearman`` - the same without the
  absolute value. A constant map has no ranking: its correlation with a non-constant map is 0,
  with another constant map 1.
* ``ssim`` - mean SSIM (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, the border
  of 5 pixels where the window does not fit left out, as scikit-image's ``structural_similarity(...,
  gaussian_weights=True, use_sample_covariance=False)``) of |map| scaled by its maximum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MethodError
from ..render import to_input_size

MEASURES = ("spearman_abs", "spearman", "ssim")




def average_ranks(v: Tensor) -> Tensor:
    """Ranks 1..N of each row of ``v`` (B, N); tied values share the mean of their ranks."""
    b, n = v.shape
    order = v.argsort(dim=1, stable=True)
    s = v.gather(1, order)
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new_group.long().cumsum(1) - 1 + torch.arange(b, device=v.device)[:, None] * n  # unique per row
    pos = torch.arange(n, device=v.device, dtype=torch.float64).expand(b, n).flatten()
    g = group.flatten()
    first = torch.full((b * n,), float("inf"), dtype=torch.float64, device=v.device).scatter_reduce(
        0, g, pos, "amin")
    last = torch.full((b * n,), -1.0, dtype=torch.float64, device=v.device).scatter_reduce(0, g, pos, "amax")
    rank_sorted = ((first[g] + last[g]) / 2 + 1).view(b, n)
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation per row of (B, ...) tensors -> (B,) float32. A constant row
    correlates 0 with a non-constant one and 1 with another constant one."""
    ra = average_ranks(a.flatten(1).double())
    rb = average_ranks(b.flatten(1).double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    va, vb = (ra * ra).sum(1), (rb * rb).sum(1)
    r = (ra * rb).sum(1) / (va * vb).clamp_min(1e-300).sqrt()
    const_a, const_b = va <= 0, vb <= 0
    r = torch.where(const_a | const_b, (const_a & const_b).double(), r)
    return r.clamp(-1, 1).float()


def _gaussian_window(sigma: float, device: torch.device) -> Tensor:
    radius = int(3.5 * sigma + 0.5)  # scipy.ndimage's truncate=3.5, as scikit-image uses
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a: Tensor, b: Tensor, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Mean structural similarity per image of (B, H, W) maps -> (B,) float32.

    Gaussian-weighted local statistics (population covariance) over the positions where the
    whole window fits, as ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)`` averages them."""
    w = _gaussian_window(sigma, a.device)
    k = w.numel()
    if a.shape[-1] < k or a.shape[-2] < k:
        raise MethodError(f"ssim needs maps of at least {k}x{k} pixels, got {tuple(a.shape[-2:])}")
    x = torch.stack([a, b, a * a, b * b, a * b], 1).double()  # (B, 5, H, W)
    c = x.shape[1]
    x = F.conv2d(x, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = F.conv2d(x, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    ux, uy, uxx, uyy, uxy = x.unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def _unit_scale(m: Tensor) -> Tensor:
    peak = m.flatten(1).amax(1)[:, None, None]
    return torch.where(peak > 0, m / peak.clamp_min(1e-30), torch.zeros_like(m))


def compare(original: Tensor, randomized: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
    """The three similarities of (B, h, w) raw maps at the model input's ``size`` -> name -> (B,)."""
    o = to_input_size(original.float(), size)
    r = to_input_size(randomized.float(), size)
    return {
        "spearman_abs": spearman(o.abs(), r.abs()),
        "spearman": spearman(o, r),
        "ssim": ssim(_unit_scale(o.abs()), _unit_scale(r.abs())),
    }
