"""Maps to pictures, on the device: channel reduction, normalisation, upsampling into each
image's own frame, colormap lookup and blending. Only the finished uint8 overlay leaves the device.

Colour convention (documented in README): unsigned maps go from 0 (low end of the colormap, blue
for jet) to 1 (high end, red); signed maps are rendered with a diverging colormap centred on 0
(blue negative, white zero, red positive) or as magnitude, as the method's ``render`` knob says.

How a method's map is drawn is its :class:`Style`: the percentile of |map| drawn at the colour
bar's end (larger values saturate, as Captum's ``outlier_perc``) and the blend (a constant alpha,
or an alpha that grows with |map| so that the photo shows where the map is near zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# How a signed map is shown: its sign kept (a diverging colormap), its magnitude, or its positive part.
Render = Literal["diverging", "magnitude", "positive"]
# How a pixel map (B, C, H, W) becomes one value per pixel.
ChannelReduce = Literal["max_abs", "sum", "mean", "l2"]
# How a colour is laid over the photo: a constant alpha, or an alpha that grows with |map| (Style).
Blend = Literal["alpha", "heat"]


def _percentile(v: float) -> str | None:
    return None if 50 <= v <= 100 else "must be a percentile between 50 and 100"


@dataclass(frozen=True)
class Style:
    """How a method's maps are drawn (``output.style.METHOD`` in the config).

    ``clip``: the percentile of |map| (per image) drawn with the colour bar's end colour; values
    above it saturate. 100 draws the maximum there (no clipping). ``blend``: ``alpha`` blends the
    colour onto the photo with the output's constant ``alpha``; ``heat`` with an alpha that grows
    with |map| (0 where the map is 0, so the photo stays as it is there, :func:`heat_peak` where it
    saturates)."""

    clip: float = field(default=100.0, metadata={"check": _percentile})
    blend: Blend = "alpha"


def default_style(family: str, space: str, signed: bool) -> Style:
    """The style a method gets unless the config says otherwise (README, "How maps are drawn").

    * Pixel-space gradient attributions (saliency, guided backprop, DeconvNet, guided Grad-CAM,
      SmoothGrad, Integrated Gradients) are heavy-tailed: a few pixels hold most of the mass and,
      scaled by the maximum, the rest is a faint speckle. They are clipped at the 99th percentile
      of |map| (Captum's ``visualize_image_attr`` clips at 98 by default) and blended by
      ``heat``, so the photo stays legible where the attribution is near zero.
    * Other signed pixel maps (occlusion, superpixel surrogates) are smooth or piecewise constant:
      no clipping, ``heat`` blend (zero shows the photo, not a white wash of the diverging map).
    * Layer maps (the CAM family, Score-CAM): no clipping, the constant ``alpha`` blend (the usual
      look of a CAM overlay).
    """
    if space == "pixel" and family == "gradient":
        return Style(clip=99.0, blend="heat")
    if space == "pixel" and signed:
        return Style(clip=100.0, blend="heat")
    return Style()

_CV2_MAPS = {
    "jet": "COLORMAP_JET",
    "turbo": "COLORMAP_TURBO",
    "viridis": "COLORMAP_VIRIDIS",
    "inferno": "COLORMAP_INFERNO",
    "magma": "COLORMAP_MAGMA",
    "plasma": "COLORMAP_PLASMA",
    "hot": "COLORMAP_HOT",
}


@cache
def _lut_numpy(name: str) -> np.ndarray:
    """(256, 3) uint8 RGB lookup table."""
    ramp = np.arange(256, dtype=np.float64) / 255.0
    if name in _CV2_MAPS:
        import cv2

        bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], getattr(cv2, _CV2_MAPS[name]))
        return np.ascontiguousarray(bgr[:, 0, ::-1])
    if name == "gray":
        v = np.round(ramp * 255)
        return np.stack([v, v, v], 1).astype(np.uint8)
    if name in ("bwr", "coolwarm"):
        # Diverging: blue (0) -> white (0.5) -> red (1); coolwarm is the softer Moreland variant.
        lo, hi = ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0)) if name == "bwr" else ((0.23, 0.30, 0.75), (0.71, 0.02, 0.15))
        t = np.clip(ramp * 2, 0, 1)[:, None]
        u = np.clip(ramp * 2 - 1, 0, 1)[:, None]
        lower = np.array(lo) * (1 - t) + np.ones(3) * t
        upper = np.ones(3) * (1 - u) + np.array(hi) * u
        rgb = np.where(ramp[:, None] <= 0.5, lower, upper)
        return np.round(rgb * 255).astype(np.uint8)
    raise ValueError(f"unknown colormap {name!r}")


_LUTS: dict[tuple[str, str], Tensor] = {}


def colormap(name: str, device: torch.device) -> Tensor:
    key = (name, str(device))
    if key not in _LUTS:
        _LUTS[key] = torch.from_numpy(_lut_numpy(name)).to(device)
    return _LUTS[key]


def reduce_channels(m: Tensor, how: ChannelReduce = "max_abs") -> Tensor:
    """(B, C, H, W) pixel maps -> (B, H, W); (B, H, W) passes through."""
    if m.dim() == 3:
        return m
    if how == "max_abs":
        return m.abs().amax(1)
    if how == "sum":
        return m.sum(1)
    if how == "mean":
        return m.mean(1)
    if how == "l2":
        return m.norm(dim=1)
    raise ValueError(f"unknown channel reduction {how!r}")


def normalize(m: Tensor, signed: Render | None = None) -> Tensor:
    """Per-image scaling of (B, H, W) maps: unsigned -> [0, 1] by min-max; ``diverging`` -> [-1, 1]
    by the largest magnitude; ``magnitude`` -> |m| / max|m|; ``positive`` -> max(m, 0) / max.
    A constant map becomes all zeros (nothing to show), never NaN."""
    flat = m.flatten(1)
    if signed is None:
        lo = flat.amin(1)[:, None, None]
        span = flat.amax(1)[:, None, None] - lo
        return torch.where(span > 0, (m - lo) / span.clamp_min(1e-30), torch.zeros_like(m))
    if signed == "positive":
        m = m.clamp_min(0)
    elif signed == "magnitude":
        m = m.abs()
    peak = m.flatten(1).abs().amax(1)[:, None, None]
    return torch.where(peak > 0, m / peak.clamp_min(1e-30), torch.zeros_like(m))


def clip_scale(m: Tensor, percentile: float) -> Tensor | None:
    """Per image of normalised maps (B, h, w): the ``percentile`` of |m| (by rank, the same
    value for any batch), the divisor that puts it at the colour bar's end; None at 100. A map
    whose percentile is 0 (mostly zeros) keeps its maximum there (divisor 1)."""
    if percentile >= 100:
        return None
    flat = m.abs().flatten(1)
    k = max(1, min(flat.shape[1], int(np.ceil(percentile / 100 * flat.shape[1]))))
    q = flat.kthvalue(k, dim=1).values
    return torch.where(q > 0, q, torch.ones_like(q))


def to_input_size(m: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W) at the model input's size (bilinear), identity if already there."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def place(m: Tensor, height: int, width: int, window: tuple[float, float, float, float]) -> tuple[Tensor, Tensor | None]:
    """One (h, w) map into the original (height, width) frame. The map covers ``window``
    (top, left, h, w) of the original; outside it the map is 0 and the returned mask False
    (mask None when the window is the whole image)."""
    top, left, wh, ww = window
    if top <= 0 and left <= 0 and wh >= height and ww >= width and abs(wh - height) < 1 and abs(ww - width) < 1:
        return F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0], None
    th, tw = max(1, round(wh)), max(1, round(ww))
    up = F.interpolate(m[None, None], size=(th, tw), mode="bilinear", align_corners=False)[0, 0]
    t, lft = round(top), round(left)
    out = torch.zeros(height, width, dtype=m.dtype, device=m.device)
    mask = torch.zeros(height, width, dtype=torch.bool, device=m.device)
    y0, x0 = max(t, 0), max(lft, 0)
    y1, x1 = min(t + th, height), min(lft + tw, width)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = up[y0 - t : y1 - t, x0 - lft : x1 - lft]
        mask[y0:y1, x0:x1] = True
    return out, mask


def overlay(image: Tensor, heat: Tensor, lut: Tensor, alpha: float, signed: bool = False,
            mask: Tensor | None = None, blend: Blend = "alpha") -> Tensor:
    """Blend a colormapped map onto an image. image uint8 (3, H, W); heat (H, W) in [0, 1]
    (or [-1, 1] when ``signed``; values beyond saturate); returns uint8 (H, W, 3). Outside
    ``mask`` the image is kept.

    Each output byte is round(pixel * (1 - a) + colour * a) in the heat's float type, with
    a = alpha (``blend`` alpha) or heat_peak(alpha) x |v| for the colour index's value v (``heat``): a
    function of two bytes (pixel value, colour index), looked up in a 256 x 256 table per
    channel computed once with those same operations, so the result is exactly the float blend's
    at a fraction of its cost (a few integer passes instead of a dozen float ones at full size).
    """
    v = (heat + 1) * 0.5 if signed else heat
    idx = (v.clamp(0, 1) * 255).round().long()
    table = _blend_table(lut, alpha, heat.dtype, blend_weights(blend, signed))  # (3, 256 * 256) uint8
    key = image.reshape(3, -1).long().mul_(256).add_(idx.reshape(1, -1))
    out = torch.gather(table, 1, key).view(image.shape)
    if mask is not None:
        out = torch.where(mask, out, image)
    return out.permute(1, 2, 0).contiguous()


def blend_weights(blend: Blend, signed: bool) -> str | None:
    """Which per-colour-index weight a blend uses: None (constant), ``ramp`` (k / 255: unsigned
    heat) or ``vee`` (diverging heat: |2k / 255 - 1|, shifted so that both middle indices, where 0
    falls, weigh 0)."""
    if blend == "alpha":
        return None
    return "vee" if signed else "ramp"


def heat_peak(alpha: float) -> float:
    """The alpha of a ``heat`` blend at the colour bar's end: twice the output's ``alpha`` (at
    most 1), so that its average over a map is about ``alpha`` while the strongest values show
    in full colour (at the default 0.5: 0 where the map is 0, 1 where it saturates)."""
    return min(1.0, 2.0 * alpha)


def index_weights(kind: str | None) -> np.ndarray:
    """(256,) float64 weight of each colour index for :func:`blend_weights`' kinds (1 for None)."""
    k = np.arange(256, dtype=np.float64)
    if kind == "ramp":
        return k / 255
    if kind == "vee":  # 0 at both middle indices (127, 128: where 0 falls), 1 at both ends
        return np.clip((np.abs(2 * k / 255 - 1) - 1 / 255) / (1 - 1 / 255), 0, 1)
    return np.ones(256)


_BLEND: dict[tuple[int, float, torch.dtype, str | None], tuple[Tensor, Tensor]] = {}


def _blend_table(lut: Tensor, alpha: float, dtype: torch.dtype, weights: str | None = None) -> Tensor:
    """table[c, pixel * 256 + k] = round(pixel * (1 - a) + lut[k, c] * a) as uint8, a = alpha in
    ``dtype`` (times the colour index's weight, see :func:`blend_weights`): the blend of every
    (pixel value, colour index) pair, on the LUT's device."""
    key = (id(lut), float(alpha), dtype, weights)
    hit = _BLEND.get(key)
    if hit is not None and hit[0] is lut:
        return hit[1]
    if weights is None:
        a = torch.full((1, 1, 1), alpha, dtype=dtype, device=lut.device)
    else:
        w = heat_peak(alpha) * index_weights(weights)
        a = torch.from_numpy(w).to(dtype=dtype, device=lut.device)[None, :, None]
    pixel = torch.arange(256, dtype=dtype, device=lut.device)[:, None, None]  # (256, 1, 1)
    colour = lut.to(dtype)[None]  # (1, 256, 3)
    t = (pixel * (1 - a) + colour * a).round_().clamp_(0, 255).to(torch.uint8)  # (pixel, k, c)
    table = t.permute(2, 0, 1).reshape(3, 256 * 256).contiguous()
    _BLEND[key] = (lut, table)  # the LUT is kept alive with its table, so its id is not reused
    return table


@dataclass(frozen=True)
class Palette:
    """How a run colours its maps: the colour tables (on the device) for unsigned and for
    diverging maps, and the blend's alpha."""

    unsigned: Tensor
    diverging: Tensor
    alpha: float

    @staticmethod
    def of(colormap_name: str, diverging_name: str, alpha: float, device: torch.device) -> Palette:
        return Palette(colormap(colormap_name, device), colormap(diverging_name, device), alpha)


def compose(images: Sequence[Tensor], maps: Tensor, windows: Sequence[tuple[float, float, float, float]],
            palette: Palette, *, signed: bool, boxes: Tensor | None = None, overlays: bool = True,
            style: Style | None = None) -> tuple[list[np.ndarray | None], list[int]]:
    """Each normalised map of ``maps`` (B, h, w) placed in its image's frame (``windows``, see
    :func:`place`): the overlay as uint8 (H, W, 3) on the host, drawn as ``style`` says (clipped
    at a percentile of |map|, blended), with ``boxes`` (B, T, 4) outlined when given (None when
    ``overlays`` is off), and the flat index of the map's peak (of |map| when ``signed``; before
    any clipping) in the image. On CUDA the copies to the host are queued, not waited for: the
    caller synchronises once before it reads the arrays."""
    out: list[np.ndarray | None] = []
    peaks = []
    lut = palette.diverging if signed else palette.unsigned
    style = style or Style()
    scale = clip_scale(maps, style.clip) if overlays else None
    for i, img in enumerate(images):
        placed, mask = place(maps[i], int(img.shape[1]), int(img.shape[2]), windows[i])
        peaks.append(placed.abs().flatten().argmax() if signed else placed.flatten().argmax())
        if not overlays:
            out.append(None)
            continue
        heat = placed if scale is None else placed / scale[i]
        ov = overlay(img, heat, lut, palette.alpha, signed=signed, mask=mask, blend=style.blend)
        if boxes is not None:
            ov = draw_boxes(ov, boxes[i].reshape(-1, 4))
        out.append(ov.to("cpu", non_blocking=img.device.type == "cuda").numpy())
    return out, torch.stack(peaks).cpu().tolist()


def draw_boxes(rgb: Tensor, boxes: Tensor, color: tuple[int, int, int] = (255, 255, 255),
               thickness: int | None = None) -> Tensor:
    """Outline inclusive [x0, y0, x1, y1] boxes (N, 4) on a uint8 (H, W, 3) image (a copy); NaN
    boxes are skipped. The outline lies inside the box; its width scales with the image."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    t = thickness or max(1, round(min(h, w) / 150))
    out = rgb.clone()
    col = torch.tensor(color, dtype=rgb.dtype, device=rgb.device)
    for box in boxes.reshape(-1, 4).tolist():
        if any(v != v for v in box):  # NaN: no box at this threshold
            continue
        x0, y0, x1, y1 = (int(v) for v in box)
        x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
        y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
        out[y0 : min(y0 + t, y1 + 1), x0 : x1 + 1] = col
        out[max(y1 - t + 1, y0) : y1 + 1, x0 : x1 + 1] = col
        out[y0 : y1 + 1, x0 : min(x0 + t, x1 + 1)] = col
        out[y0 : y1 + 1, max(x1 - t + 1, x0) : x1 + 1] = col
    return out
