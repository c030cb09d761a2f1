"""Perturbation methods: the class score of many altered copies of each image, forwarded in chunks
of the engine's budget. The altered copies are built on the device slice by slice (never all at
once: 169 occluded 224x224 copies of 16 images would be 1.6 GB), so memory stays at one chunk.

* ``occlusion``: slide a window over the image, replace it by a fill, map = score drop (pixel, signed);
* ``scorecam``: each activation channel, upsampled and min-max scaled, masks the input (layer map);
* ``superpixel``: LIME / KernelSHAP surrogate over grid or SLIC segments (pixel, signed).

Fills (``fill`` knob) are in model space, i.e. after the preprocessing's mean/std normalisation:
``zero`` (0: the normalisation mean colour, e.g. ImageNet grey), ``mean`` (each image's own mean
colour per channel), ``blur`` (a Gaussian blur of the image, sigma ``blur_sigma`` times its longer
side: removes detail but keeps colour, so the model sees less of an out-of-distribution patch), or a
number (a constant in model space).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import fraction, non_negative, positive
from ..errors import ConfigError, MethodError
from ..ops import gaussian_blur
from ..render import Render
from . import register
from .batch import Batch, MethodOutput
from .cam import combine

FILLS = ("zero", "mean", "blur")


def _fill_check(v: str | float) -> str | None:
    if isinstance(v, str) and v not in FILLS:
        return "must be 'zero', 'mean', 'blur' or a number (a constant in model space)"
    return None


def _size_check(v: int | tuple[int, int]) -> str | None:
    sizes = (v, v) if isinstance(v, int) else v
    return None if all(s > 0 for s in sizes) else "must be positive"


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------
# Shared piece: the fills


def fill_image(x: Tensor, fill: str | float, blur_sigma: float) -> Tensor:
    """What hidden pixels are replaced with, broadcastable to ``x`` (B, C, H, W); see the module doc."""
    if not isinstance(fill, str):
        return x.new_full((1, 1, 1, 1), float(fill))
    if fill == "zero":
        return x.new_zeros((1, 1, 1, 1))
    if fill == "mean":
        return x.mean((2, 3), keepdim=True)
    if fill == "blur":
        return gaussian_blur(x, blur_sigma * max(x.shape[-2:]), fold_channels=True)
    raise ConfigError(f"fill: unknown value {fill!r}", "use zero, mean, blur or a number")


# --------------------------------------------------------------------------------------------
# Occlusion


@dataclass(frozen=True)
class OcclusionParams:
    # Window (h, w) in model-input pixels; one number for a square. Larger than the input: clipped.
    window: int | tuple[int, int] = field(default=32, metadata={"check": _size_check})
    # Step between windows; default half the window. Must not exceed the window (every pixel covered).
    stride: int | tuple[int, int] | None = field(default=None, metadata={"check": _size_check})
    fill: str | float = field(default="zero", metadata={"check": _fill_check})
    blur_sigma: float = field(default=0.05, metadata={"check": positive})  # fill=blur: fraction of the side
    render: Render = "diverging"

    def __post_init__(self) -> None:
        if self.stride is not None:
            (wh, ww), (sh, sw) = _pair(self.window), _pair(self.stride)
            if sh > wh or sw > ww:
                raise ConfigError(
                    f"methods.occlusion.stride: {self.stride!r} is larger than the window {self.window!r}; "
                    "pixels between windows would get no value",
                    "use a stride <= window (default: half the window)",
                )

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(window h, window w, stride h, stride w) for an input of this size."""
        wh, ww = _pair(self.window)
        wh, ww = min(wh, height), min(ww, width)
        sh, sw = _pair(self.stride) if self.stride is not None else (max(1, wh // 2), max(1, ww // 2))
        return wh, ww, min(sh, wh), min(sw, ww)


def _starts(size: int, window: int, stride: int) -> int:
    """Number of window positions along one axis: 0, s, 2s, ... until the window reaches the end
    (the last one may hang over the edge and is clipped), as Captum's Occlusion."""
    return math.ceil((size - window) / stride) + 1


def window_rows(size: int, window: int, stride: int, device: torch.device) -> Tensor:
    """(n, size) bool: which pixels of one axis each window position covers."""
    n = _starts(size, window, stride)
    start = torch.arange(n, device=device)[:, None] * stride
    pix = torch.arange(size, device=device)[None]
    return (pix >= start) & (pix < start + window)


def _occlusion_cost(p: OcclusionParams, channels: int | None) -> tuple[int | str, int]:
    wh, ww, sh, sw = p.geometry(224, 224)
    n = _starts(224, wh, sh) * _starts(224, ww, sw)
    # Counts include the shared forward. The window count depends on the input size, which the
    # registry does not see: quote it at 224x224.
    return f"{1 + n} (224×224 input)", 0


@register(
    "occlusion",
    family="perturbation",
    summary="Occlusion: score drop when a sliding window is hidden, averaged over the windows per pixel",
    paper="Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=OcclusionParams,
    cost=_occlusion_cost,
)
def occlusion(batch: Batch, p: OcclusionParams) -> Tensor:
    """map[b, i, j] = mean over the windows covering pixel (i, j) of f_c(x_b) - f_c(x_b with the
    window replaced by the fill), f_c the target logit: Captum's Occlusion (sum of the drops of the
    covering windows divided by their count), with the window spanning all colour channels.
    Positive where hiding the pixel lowers the class score. (B, H, W), signed.

    Windows start at 0, s, 2s, ... and the last one may be clipped at the border. The occluded
    copies are made chunk by chunk on the device; per image: n_y * n_x forwards."""
    x = batch.x
    b, _, h, w = x.shape
    wh, ww, sh, sw = p.geometry(h, w)
    rows = window_rows(h, wh, sh, x.device)  # (ny, H)
    cols = window_rows(w, ww, sw, x.device)  # (nx, W)
    ny, nx = rows.shape[0], cols.shape[0]
    nwin = ny * nx
    fill = fill_image(x, p.fill, p.blur_sigma).expand_as(x)

    def build(idx: Tensor) -> Tensor:
        img, win = idx // nwin, idx % nwin
        hide = rows[win // nx][:, None, :, None] & cols[win % nx][:, None, None, :]  # (n, 1, H, W)
        return torch.where(hide, fill[img], x[img])

    scores = batch.runner.scores_of(build, b * nwin, batch.targets.repeat_interleave(nwin))
    drop = batch.target_scores()[:, None] - scores.view(b, nwin)
    r, c = rows.to(drop.dtype), cols.to(drop.dtype)
    total = torch.einsum("byx,yh,xw->bhw", drop.view(b, ny, nx), r, c)
    return total / (r.sum(0)[:, None] * c.sum(0)[None, :])


# --------------------------------------------------------------------------------------------
# Score-CAM


@dataclass(frozen=True)
class ScoreCamParams:
    # softmax: weights = softmax over channels of the masked inputs' target logits (Algorithm 1 of
    #   the paper, pytorch-grad-cam, TorchCAM); increase: the paper's "confidence increase"
    #   (Eq. 7), softmax probability of the class on the masked input minus that on the all-zero
    #   baseline input (x times an all-zero mask), used as weights without normalisation.
    weighting: Literal["softmax", "increase"] = "softmax"
    # Faster-Score-CAM: only the channels with the largest spatial variance (0: all channels).
    max_channels: int = field(default=0, metadata={"check": non_negative})
    # Upsampling of the channels to the input size. pytorch-grad-cam uses UpsamplingBilinear2d
    # (align_corners=True); the default matches the engine's own upsampling of maps (False).
    align_corners: bool = False
    relu: bool = True


def channel_masks(acts: Tensor, size: tuple[int, int], align_corners: bool = False) -> Tensor:
    """(n, 1, h, w) activation channels -> (n, 1, H, W) masks in [0, 1]: bilinear upsampling, then
    min-max over each map (eps 1e-8 as pytorch-grad-cam, so a constant channel gives a zero mask)."""
    up = F.interpolate(acts, size=size, mode="bilinear", align_corners=align_corners)
    flat = up.flatten(1)
    lo = flat.amin(1)[:, None, None, None]
    hi = flat.amax(1)[:, None, None, None]
    return (up - lo) / (hi - lo + 1e-8)


def _scorecam_cost(p: ScoreCamParams, channels: int | None) -> tuple[int | str, int]:
    # Counts include the shared forward; `increase` adds one zero-input forward per batch, not counted.
    if channels is None:
        return (f"1 + min(C, {p.max_channels})" if p.max_channels else "1 + C (channels)"), 0
    return 1 + (min(channels, p.max_channels) if p.max_channels else channels), 0


@register(
    "scorecam",
    family="cam",
    summary="Score-CAM: each upsampled channel masks the input; weights from the masked scores",
    paper="Wang et al. 2020, Score-CAM: Score-Weighted Visual Explanations for CNNs",
    space="layer",
    params=ScoreCamParams,
    cost=_scorecam_cost,
    aliases=("score_cam",),
)
def scorecam(batch: Batch, p: ScoreCamParams) -> Tensor:
    """M_k = s(Up(A_k)) with s the min-max scaling; y_k = f_c(x * M_k) for every channel k;
    map = ReLU(sum_k alpha_k A_k) at the layer's resolution (B, h, w), with alpha = softmax_k(y)
    (``softmax``) or p_c(x * M_k) - p_c(0) (``increase``). With ``max_channels`` only the channels
    of largest spatial variance take part (Faster-Score-CAM, as tf-keras-vis' ``max_N``).

    Cost: K masked forwards per image (K = channels or max_channels); ``increase`` adds one forward
    of the zero input per batch."""
    a, _ = batch.spatial(grads=False)
    b, c, h, w = a.shape
    if p.max_channels and c > p.max_channels:
        keep = a.flatten(2).var(2).topk(p.max_channels, dim=1).indices  # (B, K)
        a = a.gather(1, keep[:, :, None, None].expand(-1, -1, h, w))
    k = a.shape[1]
    x = batch.x
    size = (int(x.shape[-2]), int(x.shape[-1]))

    def build(idx: Tensor) -> Tensor:
        img, ch = idx // k, idx % k
        return x[img] * channel_masks(a[img, ch][:, None], size, p.align_corners).to(x.dtype)

    targets = batch.targets.repeat_interleave(k)
    if p.weighting == "softmax":
        weights = batch.runner.scores_of(build, b * k, targets).view(b, k).softmax(1)
    else:
        probs = batch.runner.scores_of(build, b * k, targets, prob=True).view(b, k)
        base = batch.runner.logits(torch.zeros_like(x[:1])).softmax(1)[0, batch.targets]  # (B,)
        weights = probs - base[:, None]
    return combine(weights, a, p.relu)


# --------------------------------------------------------------------------------------------
# Superpixel surrogate (LIME / KernelSHAP)


@dataclass(frozen=True)
class SuperpixelParams:
    # grid: a regular g x g grid with g = round(sqrt(segments)), made on the device (no dependency);
    # slic: scikit-image's SLIC superpixels (about `segments` of them), computed on the host.
    segmentation: Literal["grid", "slic"] = "grid"
    segments: int = field(default=49, metadata={"check": positive})
    compactness: float = field(default=10.0, metadata={"check": positive})  # SLIC only
    samples: int = field(default=256, metadata={"check": positive})  # perturbed copies per image
    # lime: coalitions with each segment kept with probability keep_prob, weighted by LIME's
    #   exponential kernel on the cosine distance to the full image, ridge with an intercept;
    # kernelshap: coalition sizes drawn from the Shapley kernel, least squares with the
    #   efficiency constraint sum(coef) = f(x) - f(all segments hidden) (Lundberg & Lee 2017);
    #   all coalitions are enumerated (exact Shapley values) when 2^M - 2 <= samples.
    kernel: Literal["lime", "kernelshap"] = "lime"
    keep_prob: float = field(default=0.5, metadata={"check": fraction})  # lime only
    kernel_width: float = field(default=0.25, metadata={"check": positive})  # lime only (LIME's default)
    # Ridge penalty; None: 1.0 for lime (LIME's Ridge(alpha=1)), 0 for kernelshap (unregularised).
    alpha: float | None = field(default=None, metadata={"check": non_negative})
    fill: str | float = field(default="mean", metadata={"check": _fill_check})
    blur_sigma: float = field(default=0.05, metadata={"check": positive})
    render: Render = "diverging"

    def grid_side(self) -> int:
        return max(1, round(math.sqrt(self.segments)))


def grid_segments(b: int, h: int, w: int, side: int, device: torch.device) -> Tensor:
    """(B, H, W) labels of a side x side grid, row-major, on the device."""
    ry = torch.arange(h, device=device) * side // h
    rx = torch.arange(w, device=device) * side // w
    return (ry[:, None] * side + rx[None, :]).expand(b, h, w)


def slic_segments(x: Tensor, segments: int, compactness: float) -> tuple[Tensor, list[int]]:
    """SLIC superpixels of each image: (B, H, W) labels 0..M_b-1 on x's device, and M_b per image.

    The one host step of the perturbation methods, kept here on purpose: SLIC is scikit-image's
    CPU (Cython) algorithm with no torch equivalent, so each image goes to the host once. The
    labels come back to the device and everything after (sampling, forwards, regression) stays
    there. Use ``segmentation: grid`` to avoid it. Images are min-max scaled to [0, 1] first, as
    SLIC's Lab conversion expects RGB in that range."""
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise MethodError(
            "superpixel: segmentation 'slic' needs scikit-image, which is not installed",
            "pip install scikit-image (or pip install 'xaicli[superpixel]'), or use segmentation: grid",
        ) from None
    import numpy as np

    flat = x.detach().float().flatten(1)
    lo, hi = flat.amin(1)[:, None, None, None], flat.amax(1)[:, None, None, None]
    imgs = ((x.float() - lo) / (hi - lo).clamp_min(1e-12)).permute(0, 2, 3, 1).cpu().numpy()
    labels, counts = [], []
    for img in imgs:
        seg = slic(img.astype(np.float64), n_segments=segments, compactness=compactness,
                   start_label=0, channel_axis=-1)
        _, inverse = np.unique(seg, return_inverse=True)  # labels made contiguous 0..M-1
        labels.append(inverse.reshape(seg.shape))
        counts.append(int(inverse.max()) + 1)
    return torch.from_numpy(np.stack(labels)).to(x.device, torch.long), counts


def shapley_kernel(m: int, sizes: Tensor) -> Tensor:
    """KernelSHAP weight (M-1) / (C(M, k) k (M-k)) of a coalition of k out of M (0 < k < M)."""
    k = sizes.double()
    log_binom = torch.lgamma(torch.tensor(m + 1.0)) - torch.lgamma(k + 1) - torch.lgamma(m - k + 1)
    return (m - 1) / (torch.exp(log_binom) * k * (m - k))


def _coalitions(
    batch: Batch, counts: list[int], m: int, p: SuperpixelParams
) -> tuple[Tensor, Tensor]:
    """z (B, N, M) bool (segment kept) and the sample weights (B, N), drawn with each image's own
    generator so they do not depend on the batching. Segments >= M_b of an image are never kept."""
    device = batch.x.device
    n = p.samples
    if p.kernel == "kernelshap" and len(set(counts)) == 1 and m >= 2 and 2**m - 2 <= n:
        codes = torch.arange(1, 2**m - 1, device=device)
        z = (codes[:, None] >> torch.arange(m, device=device)) & 1 == 1  # every proper coalition
        wts = shapley_kernel(m, z.sum(1)).to(device)
        return z.expand(batch.size, -1, -1), wts.expand(batch.size, -1)
    zs, ws = [], []
    for g, mb in zip(batch.generators(), counts, strict=True):
        present = torch.arange(m, device=device) < mb
        if p.kernel == "lime":
            z = (torch.rand(n, m, generator=g, device=device) < p.keep_prob) & present
            # Cosine distance to the all-kept vector: 1 - sqrt(|z| / M_b); LIME's kernel on it.
            d = 1 - (z.sum(1).double() / mb).sqrt()
            ws.append(torch.exp(-(d**2) / p.kernel_width**2).sqrt())
        else:
            if mb < 2:
                z = torch.zeros(n, m, dtype=torch.bool, device=device)  # the constraint alone decides
            else:
                sizes = torch.arange(1, mb, device=device)
                k = torch.multinomial(shapley_kernel(mb, sizes).float(), n, replacement=True, generator=g) + 1
                r = torch.rand(n, m, generator=g, device=device).masked_fill(~present, 2.0)
                z = r.argsort(1).argsort(1) < k[:, None]  # a uniform subset of k present segments
            ws.append(torch.ones(n, dtype=torch.float64, device=device))
        zs.append(z)
    return torch.stack(zs), torch.stack(ws)


def _jitter(a: Tensor) -> Tensor:
    """A tiny ridge so that rank-deficient designs (few samples, absent segments) stay solvable."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    scale = a.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None].clamp_min(1e-30)
    return a + 1e-10 * scale * eye


def weighted_ridge(z: Tensor, y: Tensor, w: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Per image: minimise sum_i w_i (y_i - b0 - z_i . b)^2 + alpha |b|^2 (intercept not penalised,
    as scikit-learn's Ridge with sample_weight). z (B, N, M), y and w (B, N) -> b (B, M), b0 (B,).
    Solved batched on the device by the normal equations of the weighted-centred data."""
    z, y, w = z.double(), y.double(), w.double()
    sw = w.sum(1, keepdim=True)
    zbar = (w[..., None] * z).sum(1) / sw
    ybar = (w * y).sum(1) / sw[:, 0]
    zc, yc = z - zbar[:, None], y - ybar[:, None]
    a = zc.transpose(1, 2) @ (w[..., None] * zc)
    a = _jitter(a + alpha * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
    coef = torch.linalg.solve(a, (zc.transpose(1, 2) @ (w * yc)[..., None]))[..., 0]
    return coef, ybar - (zbar * coef).sum(1)


def constrained_least_squares(
    z: Tensor, y: Tensor, w: Tensor, alpha: float, present: Tensor, total: Tensor
) -> Tensor:
    """Per image: minimise sum_i w_i (y_i - z_i . b)^2 + alpha |b|^2 subject to sum_{present} b = total
    (KernelSHAP with phi_0 = f(all hidden) subtracted from y). Closed form with one Lagrange
    multiplier: b = A^-1 (Z'Wy - lam c), lam = (c'A^-1 Z'Wy - total) / (c'A^-1 c). Absent segments get 0."""
    z, y, w = z.double(), y.double(), w.double()
    c = present.double()
    a = z.transpose(1, 2) @ (w[..., None] * z)
    a = _jitter(a + alpha * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
    rhs = torch.stack([(z.transpose(1, 2) @ (w * y)[..., None])[..., 0], c], -1)  # (B, M, 2)
    sol = torch.linalg.solve(a, rhs)
    u, v = sol[..., 0], sol[..., 1]
    lam = ((c * u).sum(1) - total.double()) / (c * v).sum(1)
    return u - lam[:, None] * v


def weighted_r2(y: Tensor, pred: Tensor, w: Tensor) -> Tensor:
    """1 - weighted residual / weighted variance of y (LIME's ``score``); 1 for a constant y fit exactly."""
    y, pred, w = y.double(), pred.double(), w.double()
    ybar = (w * y).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    res = (w * (y - pred) ** 2).sum(1)
    tot = (w * (y - ybar) ** 2).sum(1)
    return torch.where(tot > 0, 1 - res / tot.clamp_min(1e-300), (res <= 1e-12 * (1 + tot)).double()).float()


def _superpixel_cost(p: SuperpixelParams, channels: int | None) -> tuple[int | str, int]:
    # Counts include the shared forward; kernelshap adds the all-hidden image.
    if p.kernel == "lime":
        return 1 + p.samples, 0
    if p.segmentation == "grid":
        m = p.grid_side() ** 2
        n = min(p.samples, 2**m - 2) if m < 63 else p.samples
        return 2 + n, 0
    return 2 + p.samples, 0


@register(
    "superpixel",
    family="perturbation",
    summary="LIME / KernelSHAP surrogate over grid or SLIC segments: each segment's coefficient",
    paper="Ribeiro et al. 2016 (LIME); Lundberg & Lee 2017 (KernelSHAP)",
    space="pixel",
    needs_layer=False,
    signed=True,
    params=SuperpixelParams,
    cost=_superpixel_cost,
    aliases=("lime",),
)
def superpixel(batch: Batch, p: SuperpixelParams) -> MethodOutput:
    """Model-agnostic: segments hidden at random (replaced by the fill), the target logits of the
    copies regressed on the kept/hidden indicators, each segment's coefficient painted on its
    pixels. (B, H, W), signed; ``surrogate_r2`` (weighted R^2 of the fit) goes to scores.jsonl.

    lime: the original image joins the samples (weight 1, LIME's first row); kernelshap: the
    all-hidden image is forwarded once more for phi_0 and the coefficients sum to f(x) - phi_0.
    Departures from LIME: a grid is the default segmentation (quickshift in LIME), the fill is the
    image mean colour (LIME: each segment's own mean), and scores are logits, not probabilities."""
    x = batch.x
    b, _, h, w = x.shape
    if p.segmentation == "grid":
        side = p.grid_side()
        labels, counts = grid_segments(b, h, w, side, x.device), [side * side] * b
    else:
        labels, counts = slic_segments(x, p.segments, p.compactness)
    m = max(counts)
    present = torch.arange(m, device=x.device)[None] < torch.tensor(counts, device=x.device)[:, None]
    z, wts = _coalitions(batch, counts, m, p)
    n = z.shape[1]
    flat = labels.reshape(b, h * w)
    fill = fill_image(x, p.fill, p.blur_sigma).expand_as(x)
    zf = z.reshape(b * n, m)

    def build(idx: Tensor) -> Tensor:
        img = idx // n
        keep = zf[idx].gather(1, flat[img]).view(-1, 1, h, w)
        return torch.where(keep, x[img], fill[img])

    y = batch.runner.scores_of(build, b * n, batch.targets.repeat_interleave(n)).view(b, n)
    fx = batch.target_scores()
    if p.kernel == "lime":
        alpha = 1.0 if p.alpha is None else p.alpha
        z_all = torch.cat([present[:, None], z], 1)
        y_all = torch.cat([fx[:, None], y], 1)
        w_all = torch.cat([torch.ones_like(wts[:, :1]), wts], 1)
        coef, icpt = weighted_ridge(z_all, y_all, w_all, alpha)
        r2 = weighted_r2(y_all, icpt[:, None] + (z_all.double() @ coef[..., None])[..., 0], w_all)
    else:
        alpha = 0.0 if p.alpha is None else p.alpha
        f0 = batch.runner.scores(fill.contiguous(), batch.targets)  # every segment hidden
        coef = constrained_least_squares(z, y - f0[:, None], wts, alpha, present, fx - f0)
        r2 = weighted_r2(y - f0[:, None], (z.double() @ coef[..., None])[..., 0], wts)
    attr = coef.float().gather(1, flat).view(b, h, w)
    return MethodOutput(attr, {"surrogate_r2": r2})
