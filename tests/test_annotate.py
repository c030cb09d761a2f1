"""Overlays that describe themselves (issue 11): the caption strip and its colour bar, box tags, the
per-method drawing styles (percentile clipping, heat blend) and top-k file names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaicli import render
from xaicli.annotate import (
    BACKGROUND,
    MIN_WIDTH,
    Caption,
    Legend,
    annotate,
    bar_colours,
    caption_strip,
    fit,
    font,
    font_size,
    lut_array,
    text_width,
)
from xaicli.config import Config, OutputConfig
from xaicli.errors import ConfigError
from xaicli.plan import resolve_plan
from xaicli.records import file_safe


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def legend(mode: str | None = None, blend: str = "alpha", clip: float = 100.0) -> Legend:
    return Legend.of(lut_array("bwr" if mode == "diverging" else "jet"), mode, blend, 0.5, clip)


CAPTION = Caption("integrated_gradients", "Egyptian cat", 0.7907, 1)


# --------------------------------------------------------------------------------------------
# The caption strip


@pytest.mark.parametrize("size", [(149, 224), (300, 451), (2661, 4000), (30, 40)])
def test_annotate_keeps_the_overlay_and_adds_a_strip_below(size) -> None:
    h, w = size
    rgb = photo(h, w)
    out = annotate(rgb, CAPTION, legend("diverging", "heat", 99))
    assert out.dtype == np.uint8 and out.shape[1] == max(w, MIN_WIDTH) and out.shape[0] > h
    assert np.array_equal(out[:h, :w], rgb)  # the overlay's pixels are never drawn over
    if w < MIN_WIDTH:  # a narrow image sits at the left of a legible canvas
        assert (out[:h, w:] == BACKGROUND).all()
    strip = out[h:]
    bright = (strip.min(axis=2) > 200).any(axis=1)  # rows holding light text
    assert bright.sum() >= 2 * font_size(out.shape[1]) * 0.5


def test_caption_scales_with_the_width_and_stays_within_it() -> None:
    assert font_size(224) == 11 and font_size(4000) == 83  # legible at both ends
    small, large = caption_strip(224, CAPTION, legend()), caption_strip(4000, CAPTION, legend())
    assert large.shape[0] > 5 * small.shape[0] / 2
    # At 224 px the headline does not fit on one line: method and class go on two lines (a taller
    # strip for its font size); at 4000 px it is one line.
    f = font(11)
    assert text_width("integrated_gradients  ·  Egyptian cat 79.1%, rank 1", f) > 224
    assert small.shape[0] / 11 > 1.2 * large.shape[0] / 83
    long = Caption("gradcam", "a very long class name " * 5, 0.5, 2)
    assert text_width(fit(long.headline()[1], f, 200), f) <= 200 and fit(long.headline()[1], f, 200).endswith("…")
    # Nothing is drawn in the right padding: text that does not fit is cut, not clipped by the edge.
    for width in (224, 451):
        strip = caption_strip(width, long, legend())
        pad = max(3, round(font_size(width) * 0.45))
        assert (strip[:, -pad + 1 :] == BACKGROUND).all()


def test_legend_labels_say_what_the_ends_mean() -> None:
    assert (legend().low, legend().high, legend().mid) == ("low", "high", None)
    d = legend("diverging")
    assert (d.low, d.mid, d.high) == ("negative", "0", "positive")
    assert (legend("magnitude").low, legend("magnitude").high) == ("0", "high |map|")
    assert legend().note is None and "99th percentile" in legend("magnitude", "heat", 99).note


def test_colour_bar_shows_the_colours_as_blended() -> None:
    lut = lut_array("jet")
    # Constant alpha: the colours themselves, low end to high end.
    assert np.array_equal(bar_colours(legend(), 256), lut)
    # Heat: the low end is the background (the photo shows through), the high end full colour.
    heat = bar_colours(legend("magnitude", "heat"), 256, background=(10, 20, 30))
    assert heat[0].tolist() == [10, 20, 30] and np.array_equal(heat[-1], lut[-1])
    div = bar_colours(legend("diverging", "heat"), 255, background=(0, 0, 0))
    blue, red = lut_array("bwr")[0], lut_array("bwr")[-1]
    assert np.array_equal(div[0], blue) and np.array_equal(div[-1], red) and div[127].max() <= 3


def test_boxes_are_tagged_with_their_threshold() -> None:
    rgb = np.zeros((300, 400, 3), np.uint8)
    out = annotate(rgb, Caption("gradcam", "cat", 0.9, 1), legend(), [([100, 50, 300, 250], 0.2),
                                                                       ([float("nan")] * 4, 0.5)])
    tag = out[53:75, 103:200]
    assert (tag.min(axis=2) > 200).any()  # light text on the tag, inside the box's corner
    assert (out[:50, :100] == 0).all() and (out[260:300, :] == 0).all()  # nothing outside the tag


# --------------------------------------------------------------------------------------------
# How maps are drawn


def float_blend(image, heat, lut, alpha, signed, blend):
    """The blend written out in floats (the reference for the lookup table)."""
    v = (heat + 1) * 0.5 if signed else heat
    idx = (v.clamp(0, 1) * 255).round().long()
    colours = lut[idx].float()
    if blend == "heat":
        k = idx.double()
        w = (((2 * k / 255 - 1).abs() - 1 / 255) / (1 - 1 / 255)).clamp(0, 1) if signed else k / 255
        a = (render.heat_peak(alpha) * w).float()
    else:
        a = torch.full_like(heat, alpha)
    out = image.permute(1, 2, 0).float() * (1 - a[..., None]) + colours * a[..., None]
    return out.round().clamp(0, 255).to(torch.uint8)


def test_heat_blend_equals_the_float_blend_and_keeps_the_photo_at_zero() -> None:
    pixel = torch.arange(256, dtype=torch.uint8).repeat_interleave(256).view(1, 256, 256).repeat(3, 1, 1)
    heat = torch.arange(256).repeat(256).view(256, 256).float() / 255
    for name, signed in (("jet", False), ("bwr", True)):
        lut = render.colormap(name, torch.device("cpu"))
        h = heat * 2 - 1 if signed else heat
        for alpha in (0.5, 0.3, 0.8):
            got = render.overlay(pixel, h, lut, alpha, signed=signed, blend="heat")
            assert torch.equal(got, float_blend(pixel, h, lut, alpha, signed, "heat"))
    # Where the map is 0 the photo is untouched; where it saturates the colour covers it (alpha 0.5).
    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    lut = render.colormap("bwr", torch.device("cpu"))
    zero = render.overlay(img, torch.zeros(8, 8), lut, 0.5, signed=True, blend="heat")
    assert torch.equal(zero, img.permute(1, 2, 0))
    full = render.overlay(img, torch.full((8, 8), 5.0), lut, 0.5, signed=True, blend="heat")  # beyond 1: saturates
    assert (full == lut[255]).all()


def test_clip_scale_is_the_percentile_of_each_map() -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 40, 50, generator=g) * torch.tensor([1.0, 0.5, 0.1])[:, None, None]
    maps[2] = 0
    maps[2, 0, :3] = 1.0  # almost all zeros: its 99th percentile is 0 -> no clipping
    s = render.clip_scale(maps, 99.0)
    for i in range(2):
        flat = maps[i].abs().flatten()
        k = int(np.ceil(0.99 * flat.numel()))
        assert s[i] == flat.sort().values[k - 1]  # by rank, as torch.kthvalue
        assert (maps[i].abs() <= s[i]).float().mean() >= 0.99
    assert s[2] == 1.0
    assert render.clip_scale(maps, 100.0) is None
    assert torch.equal(render.clip_scale(maps[1:2], 99.0), s[1:2])  # per image: no dependence on the batch


def test_clipping_changes_the_picture_not_the_peak() -> None:
    g = torch.Generator().manual_seed(1)
    maps = render.normalize(torch.randn(2, 32, 32, generator=g).abs() ** 4)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g) for _ in range(2)]
    windows = [(0.0, 0.0, 32.0, 32.0)] * 2
    palette = render.Palette.of("jet", "bwr", 0.5, torch.device("cpu"))
    plain, peaks = render.compose(images, maps, windows, palette, signed=False)
    clipped, peaks_c = render.compose(images, maps, windows, palette, signed=False,
                                      style=render.Style(clip=90.0, blend="heat"))
    assert peaks == peaks_c
    assert not np.array_equal(plain[0], clipped[0])
    # Same as drawing the map divided by its percentile, saturated.
    scale = render.clip_scale(maps, 90.0)
    lut = render.colormap("jet", torch.device("cpu"))
    want = float_blend(images[0], (maps[0] / scale[0]).clamp(max=1), lut, 0.5, False, "heat")
    assert np.array_equal(clipped[0], want.numpy())


def test_default_styles_per_method_and_config_overrides() -> None:
    plan = resolve_plan(Config(method=("gradcam", "saliency", "integrated_gradients", "occlusion", "smoothgrad")))
    s = plan.styles
    assert s["gradcam"] == render.Style(100.0, "alpha")
    assert s["saliency"] == s["integrated_gradients"] == s["smoothgrad"] == render.Style(99.0, "heat")
    assert s["occlusion"] == render.Style(100.0, "heat")
    cfg = Config(method=("ig",), output=OutputConfig(style={"ig": {"clip": 99.5}, "gradcam": {"blend": "heat"}}))
    plan = resolve_plan(cfg)
    assert plan.styles == {"integrated_gradients": render.Style(99.5, "heat")}
    assert plan.cfg.output.style == {"integrated_gradients": {"clip": 99.5}, "gradcam": {"blend": "heat"}}
    with pytest.raises(ConfigError, match="output.style: unknown method 'gradcm'") as e:
        resolve_plan(Config(output=OutputConfig(style={"gradcm": {}})))
    assert "gradcam" in str(e.value.hint)
    with pytest.raises(ConfigError, match=r"output.style.gradcam.clip: must be a percentile between 50 and 100"):
        resolve_plan(Config(output=OutputConfig(style={"gradcam": {"clip": 30}})))
    with pytest.raises(ConfigError, match=r"output.style.gradcam.blend: expected one of 'alpha', 'heat'"):
        resolve_plan(Config(output=OutputConfig(style={"gradcam": {"blend": "screen"}})))


def test_file_safe_class_names() -> None:
    assert file_safe("Egyptian cat", 285) == "egyptian_cat"
    assert file_safe("café au lait", 1) == "cafe_au_lait"
    assert file_safe("T-shirt/top", 0) == "t_shirt_top"
    assert file_safe("猫", 3) == "class_3"
    assert file_safe("x" * 100, 0) == "x" * 40
