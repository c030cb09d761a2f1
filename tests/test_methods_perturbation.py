"""Occlusion, Score-CAM, the superpixel surrogate (LIME / KernelSHAP) and Eigen-Grad-CAM: against
Captum and pytorch-grad-cam, against invariants that hold by construction, batch-size invariance,
model state left as found, and one CLI run each. Tiny nets, 32x32 inputs, CPU."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tests.nets import GapNet
from xaicli.api import explain_tensor
from xaicli.config import TargetConfig, build_dataclass
from xaicli.engine import Explainer
from xaicli.errors import ConfigError, MethodError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner
from xaicli.methods.perturbation import (
    OcclusionParams,
    SuperpixelParams,
    channel_masks,
    constrained_least_squares,
    weighted_ridge,
)
from xaicli.ops import gaussian_blur

B, H, W = 4, 32, 32


@pytest.fixture
def net() -> GapNet:
    return GapNet(num_classes=5, width=16, seed=3).eval()


def images(n: int = B, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H, W, generator=g) * 0.5


def blocks(n: int) -> torch.Tensor:
    """Images of four flat colour quadrants plus a little noise: SLIC finds several segments."""
    g = torch.Generator().manual_seed(7)
    colours = torch.rand(n, 4, 3, generator=g) * 2 - 1
    quad = colours.view(n, 2, 2, 3).repeat_interleave(16, 1).repeat_interleave(16, 2).permute(0, 3, 1, 2)
    return quad + 0.05 * torch.randn(n, 3, H, W, generator=g)


def explain(model: nn.Module, x: torch.Tensor, method: str, params: dict | None = None, **kw) -> torch.Tensor:
    kw.setdefault("seeds", torch.arange(x.shape[0]) + 11)
    return explain_tensor(model, x, method, layer="features", params=params, **kw)


def with_extras(model: nn.Module, x: torch.Tensor, method: str, params: dict, target: int | None = None):
    """Maps and per-image extras through the engine's core (explain_tensor returns the map only)."""
    spec = get_method(method)
    p = build_dataclass(spec.params, params, f"methods.{method}")
    tgt = TargetConfig() if target is None else TargetConfig(mode="index", index=target)
    layer = resolve_layer(model, "features") if spec.needs_layer else None
    res = Explainer(model, [(spec, p)], layer, tgt, Runner(model=model, budget=64))(x, torch.arange(x.shape[0]))
    return res.methods[0].maps[0], res.methods[0].extras[0]


def scores(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[:, target]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to rtol of the larger one's scale."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max difference {err:.3g} vs scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# Occlusion


@pytest.mark.parametrize(
    ("window", "stride", "fill"),
    [(8, 4, 0.0), (7, 4, 0.3), ((5, 9), (3, 4), 0.0), (6, 6, "blur")],
)
def test_occlusion_matches_captum(net, window, stride, fill, captum_attr) -> None:
    x = images()
    ours = explain(net, x, "occlusion", {"window": window, "stride": stride, "fill": fill}, target=2)
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    baseline = gaussian_blur(x, 0.05 * 32, fold_channels=True) if fill == "blur" else fill
    ref = captum_attr.Occlusion(net).attribute(
        x, sliding_window_shapes=(3, wh, ww), strides=(3, sh, sw), baselines=baseline, target=2,
        perturbations_per_eval=32,
    )
    assert torch.equal(ref[:, 0], ref[:, 2])  # the window spans the colour channels
    close(ours, ref[:, 0], 1e-5)
    assert ours.abs().max() > 1e-3  # not a trivially empty map


@pytest.mark.parametrize("fill", [0.0, 0.7, "zero", "mean", "blur"])
@pytest.mark.parametrize("window", [32, 100])
def test_occlusion_whole_window_is_score_drop(net, fill, window) -> None:
    x = images()
    ours = explain(net, x, "occlusion", {"window": window, "fill": fill}, target=1)
    if fill == "mean":
        filled = x.mean((2, 3), keepdim=True).expand_as(x)
    elif fill == "blur":
        filled = gaussian_blur(x, 0.05 * 32, fold_channels=True)
    else:
        filled = torch.full_like(x, 0.0 if fill == "zero" else float(fill))
    drop = scores(net, x, 1) - scores(net, filled.contiguous(), 1)
    close(ours, drop[:, None, None].expand(-1, H, W), 1e-5)


def test_occlusion_knobs_are_checked() -> None:
    with pytest.raises(ConfigError, match="stride"):
        build_dataclass(OcclusionParams, {"window": 4, "stride": 8}, "methods.occlusion")
    with pytest.raises(ConfigError, match="fill"):
        build_dataclass(OcclusionParams, {"fill": "grey"}, "methods.occlusion")
    with pytest.raises(ConfigError, match="window"):
        build_dataclass(OcclusionParams, {"window": [0, 4]}, "methods.occlusion")
    p = build_dataclass(OcclusionParams, {"window": [4, 6], "fill": 0.5}, "methods.occlusion")
    assert p.geometry(32, 32) == (4, 6, 2, 3) and p.fill == 0.5


def test_occlusion_cost_counts_windows() -> None:
    spec = get_method("occlusion")
    # (ceil((224 - 32) / 16) + 1)^2 = 169 windows, plus the shared forward.
    assert spec.cost(OcclusionParams(), None) == ("170 (224×224 input)", 0)


# --------------------------------------------------------------------------------------------
# Score-CAM


def _pgc_scale(ours: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(ours.numpy(), size))


@pytest.mark.usefixtures("pgc")
def test_scorecam_matches_pytorch_grad_cam(net) -> None:
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images()
    ours = explain(net, x, "scorecam", {"align_corners": True})  # pgc upsamples with align_corners=True
    pred = scores(net, x, slice(None)).argmax(1).tolist()
    with ScoreCAM(model=net, target_layers=[net.features]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in pred])
    ours_scaled = _pgc_scale(ours, (W, H))
    assert ref.shape == ours_scaled.shape == (B, H, W)
    assert np.abs(ours_scaled - ref).max() < 1e-4
    assert ref.max() > 0.99  # a real map, not all zeros


def _scorecam_naive(model: nn.Module, x: torch.Tensor, weighting: str, max_channels: int) -> torch.Tensor:
    """Score-CAM written the slow, obvious way: one image, one channel, one forward at a time."""
    acts = {}
    h = model.features.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    out = []
    for i in range(x.shape[0]):
        a, t = acts["a"][i], int(logits[i].argmax())
        chans = list(range(a.shape[0]))
        if max_channels:
            chans = a.flatten(1).var(1).topk(max_channels).indices.tolist()
        ys = []
        for k in chans:
            up = torch.nn.functional.interpolate(a[k][None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            with torch.no_grad():
                o = model((x[i] * mask)[None])[0]
            ys.append(o.softmax(0)[t] if weighting == "increase" else o[t])
        ys_t = torch.stack(ys)
        if weighting == "increase":
            with torch.no_grad():
                w = ys_t - model(torch.zeros(1, 3, H, W))[0].softmax(0)[t]
        else:
            w = ys_t.softmax(0)
        out.append((w[:, None, None] * a[chans]).sum(0).clamp_min(0))
    return torch.stack(out)


@pytest.mark.parametrize(("weighting", "max_channels"), [("softmax", 0), ("softmax", 5), ("increase", 0), ("increase", 3)])
def test_scorecam_matches_naive_loop(net, weighting, max_channels) -> None:
    x = images(3)
    ours = explain(net, x, "scorecam", {"weighting": weighting, "max_channels": max_channels})
    close(ours, _scorecam_naive(net, x, weighting, max_channels), 1e-5)


class RowLog:
    """A forward pre-hook that keeps every input row the model sees, in order."""

    def __init__(self, model: nn.Module) -> None:
        self.rows: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.rows.extend(args[0].detach().clone()))

    def close(self) -> None:
        self.handle.remove()


@pytest.mark.parametrize(("params", "masked"), [({}, 16), ({"max_channels": 6}, 6), ({"weighting": "increase"}, 16)])
def test_scorecam_runs_exactly_k_masked_forwards(net, params, masked) -> None:
    x = images(3)
    log = RowLog(net)
    try:
        explain(net, x, "scorecam", params, batch_size=5)
    finally:
        log.close()
    extra = 1 if params.get("weighting") == "increase" else 0  # the zero-input baseline, once per batch
    assert len(log.rows) == 3 + 3 * masked + extra  # the shared forward, then K per image
    spec = get_method("scorecam")
    p = build_dataclass(spec.params, params, "methods.scorecam")
    assert spec.cost(p, 16) == (1 + masked, 0)
    assert spec.cost(p, None)[0] in ("1 + C (channels)", "1 + min(C, 6)")


def test_scorecam_constant_channel_gives_zero_mask(net) -> None:
    const = torch.full((2, 1, 5, 5), 3.0)
    assert torch.equal(channel_masks(const, (H, W)), torch.zeros(2, 1, H, W))
    ramp = torch.arange(25.0).view(1, 1, 5, 5)
    m = channel_masks(ramp, (H, W))
    assert abs(float(m.min())) < 1e-6 and abs(float(m.max()) - 1) < 1e-6

    # Channel 0 of the target layer made constant (zero weights, bias 1, after ReLU: all ones).
    conv = net.features[3]
    with torch.no_grad():
        conv.weight[0].zero_()
        conv.bias[0] = 1.0
    x = images(2)
    log = RowLog(net)
    try:
        explain(net, x, "scorecam", {}, batch_size=64)
    finally:
        log.close()
    rows = torch.stack(log.rows)
    c = 16
    for i in range(2):
        assert torch.equal(rows[2 + i * c], torch.zeros(3, H, W))  # image i, channel 0: zero mask
        assert rows[2 + i * c + 1].abs().max() > 0


# --------------------------------------------------------------------------------------------
# Eigen-Grad-CAM


def _grad_x_act(model: GapNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = {}
    h = model.features.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    logits = model(x)
    h.remove()
    t = logits.argmax(1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), acts["a"])
    return (g * acts["a"]).detach(), t


@pytest.mark.usefixtures("pgc")
def test_eigengradcam_matches_pytorch_grad_cam(net) -> None:
    from pytorch_grad_cam import EigenGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    x = images()
    ga, t = _grad_x_act(net, x)
    # The projection itself, before ReLU: equal up to the SVD sign of each image.
    raw = explain(net, x, "eigengradcam", {"relu": False, "sign_correction": False})
    proj = torch.from_numpy(get_2d_projection(ga.numpy()))
    for i in range(B):
        sign = 1.0 if float((raw[i] * proj[i]).sum()) >= 0 else -1.0
        close(sign * raw[i], proj[i], 1e-4)
    # pgc's final map: ReLU, resized and min-max scaled twice; ours with the same sign as pgc's SVD.
    with EigenGradCAM(model=net, target_layers=[net.features]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
    signs = torch.tensor([1.0 if float((raw[i] * proj[i]).sum()) >= 0 else -1.0 for i in range(B)])
    ours = _pgc_scale((signs[:, None, None] * raw).clamp_min(0), (W, H))
    assert np.abs(ours - ref).max() < 1e-4
    # The default sign rule: the map's largest magnitude is positive.
    fixed = explain(net, x, "eigengradcam", {"relu": False})
    assert bool((fixed.flatten(1).amax(1) >= fixed.flatten(1).amin(1).abs()).all())


# --------------------------------------------------------------------------------------------
# Superpixel surrogate


def linear_net(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3 * H * W, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(3, generator=g))
    return nn.Sequential(nn.Flatten(), lin).eval()


@pytest.mark.parametrize("kernel", ["lime", "kernelshap"])
@pytest.mark.parametrize("fill", ["mean", "zero"])
def test_superpixel_recovers_linear_contributions(kernel, fill) -> None:
    model = linear_net()
    x = images(3)
    params = {"segments": 16, "samples": 64, "kernel": kernel, "alpha": 0.0, "fill": fill}
    ours, extras = with_extras(model, x, "superpixel", params, target=1)
    filled = x.mean((2, 3), keepdim=True) if fill == "mean" else torch.zeros(1, 3, 1, 1)
    per_pixel = (model[1].weight[1].detach().view(3, H, W) * (x - filled)).sum(1)  # (3, H, W)
    per_cell = per_pixel.view(3, 4, 8, 4, 8).sum((2, 4))  # the 4x4 grid's segments
    expected = per_cell.repeat_interleave(8, 1).repeat_interleave(8, 2)
    close(ours, expected, 1e-5)
    assert torch.allclose(extras["surrogate_r2"], torch.ones(3), atol=1e-6)
    # Efficiency: the segments add up to f(x) - f(all hidden).
    drop = scores(model, x, 1) - scores(model, filled.expand_as(x).contiguous(), 1)
    close(per_cell.sum((1, 2)), drop, 1e-5)


def test_superpixel_lime_ridge_shrinks_toward_zero() -> None:
    model = linear_net()
    x = images(2)
    free = explain(model, x, "superpixel", {"segments": 16, "samples": 64, "alpha": 0.0}, target=1)
    ridge = explain(model, x, "superpixel", {"segments": 16, "samples": 64, "alpha": 50.0}, target=1)
    assert float(ridge.abs().sum()) < 0.9 * float(free.abs().sum())


def _brute_force_shapley(model: nn.Module, x: torch.Tensor, fill: torch.Tensor, target: int) -> torch.Tensor:
    """Exact Shapley values of the 2x2 grid's segments by the permutation-free subset formula."""
    m = 4
    cell = torch.zeros(m, H, W, dtype=torch.bool)
    for s in range(m):
        r, c = divmod(s, 2)
        cell[s, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = True

    def value(coalition: tuple[int, ...]) -> torch.Tensor:
        keep = cell[list(coalition)].any(0) if coalition else torch.zeros(H, W, dtype=torch.bool)
        return scores(model, torch.where(keep, x, fill), target)

    phi = torch.zeros(x.shape[0], m, dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for s in itertools.combinations(others, size):
                wgt = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                phi[:, i] += wgt * (value(tuple(sorted((*s, i)))) - value(s)).double()
    return phi


def test_superpixel_kernelshap_enumerated_is_exact_shapley(net) -> None:
    x = images(3)
    ours = explain(net, x, "superpixel", {"segments": 4, "samples": 14, "kernel": "kernelshap", "fill": 0.2}, target=3)
    phi = _brute_force_shapley(net, x, torch.full((1, 3, 1, 1), 0.2), 3)
    got = ours[:, ::16, ::16].reshape(3, 4)  # one pixel per cell, row-major
    close(got.double(), phi, 1e-5)
    assert get_method("superpixel").cost(SuperpixelParams(segments=4, samples=14, kernel="kernelshap"), None) == (16, 0)


def test_superpixel_kernelshap_sampled_is_efficient(net) -> None:
    x = images(3)
    params = {"segments": 16, "samples": 48, "kernel": "kernelshap", "fill": "blur"}
    ours = explain(net, x, "superpixel", params, target=0)
    coef = ours[:, ::8, ::8].reshape(3, 16)
    drop = scores(net, x, 0) - scores(net, gaussian_blur(x, 0.05 * 32, fold_channels=True), 0)
    close(coef.sum(1), drop, 1e-5)


def test_weighted_ridge_matches_sklearn() -> None:
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(0)
    z = (torch.rand(2, 40, 6, generator=g) < 0.5).double()
    y = torch.randn(2, 40, generator=g, dtype=torch.float64)
    w = torch.rand(2, 40, generator=g, dtype=torch.float64) + 0.1
    coef, icpt = weighted_ridge(z, y, w, 1.5)
    for i in range(2):
        ref = Ridge(alpha=1.5).fit(z[i].numpy(), y[i].numpy(), sample_weight=w[i].numpy())
        np.testing.assert_allclose(coef[i].numpy(), ref.coef_, atol=1e-8)
        np.testing.assert_allclose(float(icpt[i]), ref.intercept_, atol=1e-8)


def test_constrained_least_squares_meets_constraint_and_ignores_absent() -> None:
    g = torch.Generator().manual_seed(1)
    z = (torch.rand(2, 30, 5, generator=g) < 0.5).double()
    present = torch.tensor([[True] * 5, [True, True, True, False, False]])
    z = z * present[:, None]
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    total = torch.tensor([1.5, -2.0], dtype=torch.float64)
    coef = constrained_least_squares(z, y, torch.ones(2, 30, dtype=torch.float64), 0.0, present, total)
    assert torch.allclose((coef * present).sum(1), total, atol=1e-9)
    assert torch.equal(coef[1, 3:], torch.zeros(2, dtype=torch.float64))
    # Optimality against a direct KKT solve for image 0.
    a = z[0].T @ z[0]
    kkt = torch.zeros(6, 6, dtype=torch.float64)
    kkt[:5, :5], kkt[:5, 5], kkt[5, :5] = a, 1.0, 1.0
    sol = torch.linalg.solve(kkt, torch.cat([z[0].T @ y[0], total[:1]]))
    assert torch.allclose(coef[0], sol[:5], atol=1e-7)


def test_superpixel_slic_segments_are_painted(net) -> None:
    pytest.importorskip("skimage")
    x = blocks(2)
    ours = explain(net, x, "superpixel", {"segmentation": "slic", "segments": 12, "samples": 32})
    from skimage.segmentation import slic

    for i in range(2):
        img = x[i].permute(1, 2, 0).numpy().astype(np.float64)
        img = (img - img.min()) / (img.max() - img.min())
        seg = slic(img, n_segments=12, compactness=10.0, start_label=0, channel_axis=-1)
        for s in np.unique(seg):
            vals = ours[i][torch.from_numpy(seg == s)]
            assert float(vals.max() - vals.min()) == 0.0  # one coefficient per superpixel
        assert len(torch.unique(ours[i])) > 1


def test_superpixel_slic_without_scikit_image(net, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    with pytest.raises(MethodError, match="scikit-image") as e:
        explain(net, images(1), "superpixel", {"segmentation": "slic", "samples": 4})
    assert "pip install scikit-image" in str(e.value)


def test_superpixel_seeds_change_samples(net) -> None:
    x = images(2)
    a = explain(net, x, "superpixel", {"samples": 32, "segments": 16}, seeds=torch.tensor([1, 2]))
    b = explain(net, x, "superpixel", {"samples": 32, "segments": 16}, seeds=torch.tensor([1, 2]))
    c = explain(net, x, "superpixel", {"samples": 32, "segments": 16}, seeds=torch.tensor([3, 4]))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------------------------------
# Every method: batch-size invariance and the model left as found

CASES = [
    ("occlusion", {"window": 8, "stride": 4}),
    ("occlusion", {"window": 6, "stride": 5, "fill": "blur"}),
    ("scorecam", {}),
    ("scorecam", {"weighting": "increase", "max_channels": 4}),
    ("superpixel", {"samples": 24, "segments": 16}),
    ("superpixel", {"samples": 24, "segments": 9, "kernel": "kernelshap", "fill": "blur"}),
    ("superpixel", {"samples": 16, "segments": 10, "segmentation": "slic"}),
    ("eigengradcam", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_batch_size_invariant(net, method, params) -> None:
    x = images(8, seed=5)
    seeds = torch.arange(8) * 7 + 1
    # 8 images in one batch vs one image per batch; the forward chunks differ too (64 vs 7 inputs).
    whole = explain(net, x, method, params, seeds=seeds, batch_size=64)
    ones = torch.cat([explain(net, x[i : i + 1], method, params, seeds=seeds[i : i + 1], batch_size=7) for i in range(8)])
    close(whole, ones, 1e-5)


def _state(model: nn.Module) -> dict:
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "inplace": [getattr(m, "inplace", None) for m in model.modules()],
    }


@pytest.mark.parametrize(("method", "params"), CASES)
def test_model_left_as_found(method, params) -> None:
    model = GapNet(seed=1)
    model.features[1].train()  # a mix of flags that must survive
    model.fc.eval()
    model.features[0].weight.requires_grad_(False)
    before = _state(model)
    explain(model, images(2), method, params)
    assert _state(model) == before
    if get_method(method).needs_layer:  # and on the error path: a layer without a spatial map
        with pytest.raises(MethodError):
            explain_tensor(model, images(2), method, layer="fc", params=params)
        assert _state(model) == before


# --------------------------------------------------------------------------------------------
# End to end through the CLI

KNOBS = {
    "occlusion": "methods: {occlusion: {window: 8, stride: 8, fill: blur}}\n",
    "scorecam": "methods: {scorecam: {max_channels: 8}}\n",
    "superpixel": "methods: {superpixel: {samples: 16, segments: 16, kernel: kernelshap}}\n",
    "eigengradcam": "",
}


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_cli_end_to_end(method, tiny_config, image_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xaicli.cli import app

    out = tmp_path / "out"
    cfg = tiny_config(method, KNOBS[method])
    res = CliRunner().invoke(app, ["explain", str(image_dir), "-c", str(cfg), "--out", str(out), "-q", "--save-maps"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(s) for s in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(r["status"] == "ok" for r in lines)
    for r in lines:
        (e,) = r["explanations"]
        assert e["method"] == method
        assert (out / e["files"]["overlay"]).is_file()
        raw = np.load(out / e["files"]["map"])
        assert raw.shape == (r["height"], r["width"]) and np.isfinite(raw).all()
        if method == "superpixel":
            assert 0.0 <= e["surrogate_r2"] <= 1.0 + 1e-6
    run = json.loads((out / "run.json").read_text())
    spec = get_method(method)
    knobs = (yaml.safe_load(KNOBS[method]) or {}).get("methods", {}).get(method, {})
    assert run["methods"][0]["passes"] == spec.cost_text(build_dataclass(spec.params, knobs, "m"), 16)


def test_lime_kernel_is_limes(net) -> None:
    """Sample weights: sqrt(exp(-d^2 / 0.25^2)), d the cosine distance to the all-kept row (as lime_image)."""
    from sklearn.metrics import pairwise_distances

    from xaicli.methods.batch import Batch
    from xaicli.methods.perturbation import _coalitions

    x = images(2)
    batch = Batch(x=x, targets=torch.zeros(2, dtype=torch.long), logits=torch.zeros(2, 5),
                  runner=Runner(model=net, budget=8), seeds=torch.tensor([5, 6]))
    p = SuperpixelParams(segments=9, samples=40, keep_prob=0.7)
    z, w = _coalitions(batch, [9, 9], 9, p)
    assert z.shape == (2, 40, 9) and 0.55 < float(z.double().mean()) < 0.85
    for i in range(2):
        d = pairwise_distances(z[i].double().numpy(), np.ones((1, 9)), metric="cosine")[:, 0]
        np.testing.assert_allclose(w[i].numpy(), np.sqrt(np.exp(-(d**2) / 0.25**2)), atol=1e-12)
