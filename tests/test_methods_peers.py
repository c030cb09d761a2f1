"""The methods taken from the peers (pytorch-grad-cam, TorchCAM): each against its reference on the
same model, layer and target (skipped per test when the peer is missing), against an invariant
that holds by construction, batch-size invariance, the model left as found, and one CLI run each.
Tiny nets, 32x32 inputs, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.nets import GapNet, HiddenHeadNet
from xaicli.api import explain_tensor
from xaicli.config import build_dataclass
from xaicli.errors import MethodError
from xaicli.methods import all_methods, get_method

B, H, W = 4, 32, 32


@pytest.fixture
def net() -> GapNet:
    return GapNet(num_classes=5, width=16, seed=3).eval()


def images(n: int = B, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, H, W, generator=g) * 0.5


def explain(model: nn.Module, x: torch.Tensor, method: str, params: dict | None = None, **kw) -> torch.Tensor:
    kw.setdefault("seeds", torch.arange(x.shape[0]) + 11)
    return explain_tensor(model, x, method, layer="features", params=params, **kw)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def minmax(m: torch.Tensor | np.ndarray) -> np.ndarray:
    m = torch.as_tensor(np.asarray(m), dtype=torch.float64)
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return ((m - lo) / (hi - lo + 1e-12)).numpy()


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal up to rtol of the larger one's scale."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max difference {err:.3g} vs scale {scale:.3g}"


def hidden_head(num_classes: int = 5, seed: int = 0) -> HiddenHeadNet:
    """HiddenHeadNet with its head (default PyTorch init) drawn from a seeded global RNG."""
    torch.manual_seed(seed)
    return HiddenHeadNet(num_classes=num_classes, seed=seed).eval()


class RowLog:
    """A forward pre-hook that keeps every input row the model sees, in order."""

    def __init__(self, model: nn.Module) -> None:
        self.rows: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.rows.extend(args[0].detach().clone()))

    def close(self) -> None:
        self.handle.remove()


def pgc_layer_map(cam_class, model: GapNet, x: torch.Tensor, targets: list[int], **kw) -> np.ndarray:
    """pytorch-grad-cam's map at the layer's resolution (its min-max scaled output before resizing)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cam_class(model=model, target_layers=[model.features], **kw) as cam:
        cam.compute_cam_per_layer = _no_resize(cam)
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])


def _no_resize(cam):
    """pytorch-grad-cam resizes with cv2 to the input; keep its map at the layer size instead."""
    original = cam.compute_cam_per_layer

    def per_layer(input_tensor, targets, eigen_smooth):
        size = cam.get_target_width_height
        cam.get_target_width_height = lambda t: None
        try:
            return original(input_tensor, targets, eigen_smooth)
        finally:
            cam.get_target_width_height = size

    return per_layer


# --------------------------------------------------------------------------------------------
# Ablation-CAM


@pytest.mark.parametrize("max_channels", [0, 5])
def test_ablationcam_closed_form_on_gap_linear(net, max_channels) -> None:
    """On GAP + linear, zeroing channel k lowers the logit by w_ck mean(A_k): w_k = w_ck mean(A_k) / y_c;
    with max_channels only the channels of largest spatial variance weigh."""
    x = images()
    acts = net.features(x).detach()
    y = logits(net, x)
    t = y.argmax(1)
    w = net.fc.weight.detach()[t]  # (B, C)
    weights = w * acts.mean((2, 3)) / y.gather(1, t[:, None])
    if max_channels:
        top = acts.flatten(2).var(2).topk(max_channels, 1).indices
        weights = torch.zeros_like(weights).scatter(1, top, weights.gather(1, top))
    expected = torch.einsum("bc,bchw->bhw", weights, acts).clamp_min(0)
    log = RowLog(net)
    try:
        ours = explain(net, x, "ablationcam", {"max_channels": max_channels}, batch_size=7)
    finally:
        log.close()
    close(ours, expected, 1e-4)
    assert ours.max() > 0
    k = max_channels or 16
    assert len(log.rows) == B * (1 + k)  # the shared forward, then one per ablated channel
    assert get_method("ablationcam").cost(build_dataclass(get_method("ablationcam").params, {"max_channels": max_channels}, "m"), 16) == (1 + k, 0)


def test_ablationcam_matches_pytorch_grad_cam(net, pgc) -> None:
    x = images()
    ours = explain(net, x, "ablationcam")
    ref = pgc_layer_map(pgc.AblationCAM, net, x, logits(net, x).argmax(1).tolist(), batch_size=5)
    assert ref.shape == (B, 16, 16)
    np.testing.assert_allclose(minmax(ours), ref, atol=1e-4)


# --------------------------------------------------------------------------------------------
# FullGrad


class BnNet(nn.Module):
    """conv-BN-ReLU(inplace) twice ("features"), GAP, linear; running statistics set at random."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)
            for bn in (self.features[1], self.features[5]):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _extras(model: nn.Module, x: torch.Tensor, method: str, params: dict | None = None):
    from xaicli.config import TargetConfig
    from xaicli.engine import Explainer
    from xaicli.layers import resolve_layer
    from xaicli.methods.batch import Runner

    spec = get_method(method)
    p = build_dataclass(spec.params, params or {}, f"methods.{method}")
    layer = resolve_layer(model, "features") if spec.needs_layer else None
    res = Explainer(model, [(spec, p)], layer, TargetConfig(), Runner(model=model, budget=3))(x, torch.arange(x.shape[0]))
    return res.methods[0].maps[0], res.methods[0].extras[0]


@pytest.mark.parametrize("model", [GapNet(seed=2).eval(), BnNet()])
def test_fullgrad_completeness(model) -> None:
    """Full-gradient decomposition: on a piecewise-linear net x.dy/dx + sum b.dy/dz = y - (fc bias)."""
    x = images()
    y = logits(model, x)
    t = y.argmax(1)
    heat, extras = _extras(model, x, "fullgrad")
    expected = y.gather(1, t[:, None])[:, 0] - model.fc.bias.detach()[t]
    close(extras["completeness"], expected, 1e-4)
    assert heat.shape == (B, H, W) and heat.min() >= 0


@pytest.mark.parametrize("model", [GapNet(seed=2).eval(), BnNet()])
def test_fullgrad_matches_pytorch_grad_cam(model, pgc) -> None:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = images()
    ours = explain_tensor(model, x, "fullgrad")
    with pgc.FullGrad(model=model, target_layers=[]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in logits(model, x).argmax(1).tolist()])
    assert ref.shape == (B, H, W)
    np.testing.assert_allclose(minmax(ours), ref, atol=1e-4)


# --------------------------------------------------------------------------------------------
# SS-CAM, IS-CAM (TorchCAM)


@pytest.fixture
def torchcam_methods():
    """torchcam.methods; the test is skipped without it."""
    return pytest.importorskip("torchcam.methods")


def torchcam_map(extractor_class, model: nn.Module, x: torch.Tensor, targets: list[int] | None = None,
                 **kw) -> torch.Tensor:
    """TorchCAM's normalised map at the layer's resolution for the predicted (or given) classes."""
    with extractor_class(model, "features", input_shape=tuple(x.shape[1:]), **kw) as extractor:
        out = model(x)
        idx = targets if targets is not None else out.argmax(1).tolist()
        (cam,) = extractor(class_idx=idx, scores=out)
    return cam.detach()


@pytest.mark.parametrize("samples", [1, 4])
def test_iscam_matches_torchcam(net, samples, torchcam_methods) -> None:
    x = images()
    ours = explain(net, x, "iscam", {"samples": samples})
    ref = torchcam_map(torchcam_methods.ISCAM, net, x, num_samples=samples, batch_size=7)
    np.testing.assert_allclose(minmax(ours), ref.numpy(), atol=1e-4)
    assert ours.max() > 0


def test_sscam_matches_torchcam_without_noise(net, torchcam_methods) -> None:
    """Noise of std 1e-7 is far below the scores' resolution: both reduce to the same sums."""
    x = images()
    ours = explain(net, x, "sscam", {"samples": 3, "std": 1e-7})
    ref = torchcam_map(torchcam_methods.SSCAM, net, x, num_samples=3, std=1e-7, batch_size=7)
    np.testing.assert_allclose(minmax(ours), ref.numpy(), atol=1e-4)


def test_sscam_without_noise_is_iscam_with_one_step(net) -> None:
    """std 0: every sample is the unit-strength mask, which is IS-CAM's single step (c_1 = 1)."""
    x = images()
    ss = explain(net, x, "sscam", {"samples": 3, "std": 0.0})
    iscam = explain(net, x, "iscam", {"samples": 1})
    close(ss, iscam, 1e-5)
    noisy = explain(net, x, "sscam", {"samples": 3, "std": 0.5})
    assert not torch.allclose(noisy, ss)  # the noise does reach the scores


def test_sscam_iscam_forward_counts(net) -> None:
    x = images(2)
    for method, params, per_channel in [("sscam", {"samples": 3, "max_channels": 5}, 3),
                                        ("iscam", {"samples": 2}, 2)]:
        log = RowLog(net)
        try:
            explain(net, x, method, params, batch_size=6)
        finally:
            log.close()
        k = params.get("max_channels", 16)
        assert len(log.rows) == 2 * (1 + per_channel * k)
        spec = get_method(method)
        assert spec.cost(build_dataclass(spec.params, params, "m"), 16) == (1 + per_channel * k, 0)


# --------------------------------------------------------------------------------------------
# SmoothGrad-CAM++ (TorchCAM)


def loud(model: GapNet) -> GapNet:
    """The net with its head scaled by 100: gradients far above TorchCAM's eps of 1e-8."""
    with torch.no_grad():
        model.fc.weight.mul_(100)
        model.fc.bias.mul_(100)
    return model


def test_smoothgradcampp_matches_torchcam_on_gap_linear(net, torchcam_methods) -> None:
    """On GAP + linear the layer gradient does not depend on the input, so the four samples' gradient
    moments are exact; the noise is negligible because TorchCAM multiplies the weights with the last
    noisy forward's activations (ours: the clean input's)."""
    x = images()
    model = loud(net)
    ours = explain(model, x, "smoothgradcampp", {"samples": 4, "std": 1e-7})
    ref = torchcam_map(torchcam_methods.SmoothGradCAMpp, model, x, num_samples=4, std=1e-7)
    np.testing.assert_allclose(minmax(ours), ref.numpy(), atol=5e-4)
    assert ours.max() > 0


def test_smoothgradcampp_matches_torchcam_hidden_head(torchcam_methods) -> None:
    """A hidden ReLU layer in the head: gradients depend on the input; one sample, negligible noise."""
    model = loud(hidden_head(seed=4))
    x = images()
    ours = explain(model, x, "smoothgradcampp", {"samples": 1, "std": 1e-7})
    ref = torchcam_map(torchcam_methods.SmoothGradCAMpp, model, x, num_samples=1, std=1e-7)
    # 2e-3: TorchCAM sums g^3 * A in float32 and adds eps 1e-8 where alpha is ill-conditioned
    np.testing.assert_allclose(minmax(ours), ref.numpy(), atol=2e-3)


def test_smoothgradcampp_without_noise_is_gradcampp() -> None:
    model = SmoothHeadNet(seed=5)  # a smooth head: the layer gradient changes with the noisy input
    x = images()
    close(explain(model, x, "smoothgradcampp", {"samples": 3, "std": 0.0}), explain(model, x, "gradcampp"), 1e-4)
    noisy = explain(model, x, "smoothgradcampp", {"samples": 3, "std": 1.0})
    assert not torch.allclose(noisy, explain(model, x, "gradcampp"))


# --------------------------------------------------------------------------------------------
# KPCA-CAM


@pytest.mark.parametrize("params", [{}, {"kernel": "rbf", "gamma": 0.05}, {"kernel": "poly", "degree": 2}])
def test_kpcacam_matches_pytorch_grad_cam(net, pgc, params) -> None:
    x = images()
    ours = explain(net, x, "kpcacam", params)
    kw = {"kernel": params.get("kernel", "sigmoid"), "gamma": params.get("gamma")}
    if "degree" in params:  # pytorch-grad-cam passes no degree: scikit-learn's 3
        ours = explain(net, x, "kpcacam", {**params, "degree": 3})
    ref = pgc_layer_map(pgc.KPCA_CAM, net, x, logits(net, x).argmax(1).tolist(), **kw)
    np.testing.assert_allclose(minmax(ours), ref, atol=2e-4)
    assert ours.max() > 0


def test_kpcacam_linear_kernel_is_eigencam(net) -> None:
    """Kernel PCA with the linear kernel is PCA: sqrt(lambda_1) v_1 = X v1, and both sign rules put
    the entry of largest magnitude positive."""
    x = images()
    close(explain(net, x, "kpcacam", {"kernel": "linear", "relu": False}),
          explain(net, x, "eigencam", {"relu": False}), 1e-4)


# --------------------------------------------------------------------------------------------
# Deep Feature Factorization


class RegionNet(nn.Module):
    """A 1x1 conv with non-negative weights from 3 colour channels to 6 ("features"), GAP, linear:
    on an image of three regions of pure colours the activations are exactly W (6x3) times the
    regions' indicator maps, a factorisation NMF recovers up to scale and order."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(8)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.rand(6, 3, 1, 1, generator=g) + 0.1)
            self.fc.weight.copy_(torch.randn(4, 6, generator=g))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def regions(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of three vertical bands of pure red, green, blue (widths 4, 5, 7 of 16) and the bands' masks."""
    masks = torch.zeros(3, 16, 16)
    masks[0, :, :4], masks[1, :, 4:9], masks[2, :, 9:] = 1, 1, 1
    x = torch.stack([masks * (1 + i) for i in range(n)])
    return x, masks


def test_dff_recovers_exact_concepts_in_contribution_order() -> None:
    model = RegionNet()
    x, masks = regions()
    t = logits(model, x).argmax(1)
    # Band r's contribution to y_t: fc.w[t] . (W[:, r] * value - offset) * |band| / 256, the offset
    # being each channel's minimum over the image (subtracted before the factorisation).
    w = model.features[0].weight.detach()[:, :, 0, 0]  # (6, 3)
    contrib = torch.stack([
        model.fc.weight.detach()[t[i]] @ (w - w.min(1, keepdim=True).values) * (1 + i) * masks.sum((1, 2)) / 256
        for i in range(2)
    ])
    for rank in (1, 2, 3):
        maps, extras = _extras(model, x, "dff", {"concepts": 3, "rank": rank, "iterations": 500})
        band = contrib.argsort(1, descending=True)[:, rank - 1]
        for i in range(2):
            got = maps[i] / maps[i].max()
            close(got, masks[band[i]], 1e-2)  # multiplicative updates converge slowly
        ordered = extras["concept_contributions"].sort(1, descending=True).values
        close(ordered, contrib.sort(1, descending=True).values, 1e-2)


def test_dff_matches_pytorch_grad_cam_concepts(pgc) -> None:
    """pytorch-grad-cam's NMF (scikit-learn) finds the same three concept maps, in another order."""
    from pytorch_grad_cam import DeepFeatureFactorization

    model = RegionNet()
    x, _ = regions(1)
    ref = DeepFeatureFactorization(model=model, target_layer=model.features)
    _, (ref_maps,) = ref(x, n_components=3)  # (3, 16, 16), each min-max scaled
    ours = torch.stack([_extras(model, x, "dff", {"concepts": 3, "rank": r, "iterations": 500})[0][0]
                        for r in (1, 2, 3)])
    ours = ours / ours.flatten(1).max(1).values[:, None, None]
    for m in ours:
        err = min(float((m - torch.as_tensor(r)).abs().max()) for r in ref_maps)
        assert err < 1e-2


# --------------------------------------------------------------------------------------------
# FEM


def test_fem_matches_pytorch_grad_cam(net, pgc) -> None:
    x = images()
    ours = explain(net, x, "fem")
    ref = pgc_layer_map(pgc.FEM, net, x, logits(net, x).argmax(1).tolist())
    np.testing.assert_allclose(minmax(ours), ref, atol=1e-4)
    assert ours.max() > 0


def test_fem_limits_of_k(net) -> None:
    """k -> -inf: every location passes, all weights 1, the map is the channel sum; k -> inf: none
    passes, the map is zero. Class-agnostic: the same map for every target."""
    x = images()
    acts = net.features(x).detach()
    close(explain(net, x, "fem", {"k": -1e6}), acts.sum(1).clamp_min(0), 1e-6)
    assert explain(net, x, "fem", {"k": 1e6}).abs().max() == 0
    assert torch.equal(explain(net, x, "fem", target=0), explain(net, x, "fem", target=3))


# --------------------------------------------------------------------------------------------
# Shapley-CAM


class SmoothHeadNet(GapNet):
    """GapNet with a tanh hidden layer in the head: a non-zero Hessian after the target layer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(5, 16, seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.hidden = nn.Linear(16, 16)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(16, 16, generator=g))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(self.pool(self.features(x)).flatten(1))))


def test_shapleycam_matches_pytorch_grad_cam(pgc) -> None:
    model = SmoothHeadNet(seed=6)
    x = images()
    ours = explain(model, x, "shapleycam", {"relu": True})
    ref = pgc_layer_map(pgc.ShapleyCAM, model, x, logits(model, x).argmax(1).tolist())
    np.testing.assert_allclose(minmax(ours), ref, atol=1e-4)
    assert not np.allclose(minmax(ours), minmax(explain(model, x, "gradcam")), atol=1e-3)  # the Hessian term counts


def test_shapleycam_is_gradcam_when_piecewise_linear(net) -> None:
    x = images()
    close(explain(net, x, "shapleycam", {"relu": False}), explain(net, x, "gradcam", {"relu": False}), 1e-5)
    hidden = hidden_head(seed=2)
    close(explain(hidden, x, "shapleycam"), explain(hidden, x, "gradcam"), 1e-5)


# --------------------------------------------------------------------------------------------
# Finer-CAM


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_finercam_matches_pytorch_grad_cam(pgc, alpha) -> None:
    model = hidden_head(num_classes=8, seed=3)
    x = images()
    ours = explain(model, x, "finercam", {"alpha": alpha})
    with pgc.FinerCAM(model=model, target_layers=[model.features]) as cam:
        cam.base_cam.compute_cam_per_layer = _no_resize(cam.base_cam)
        ref = cam(input_tensor=x, targets=None, alpha=alpha)
    np.testing.assert_allclose(minmax(ours), ref, atol=1e-4)
    assert ours.max() > 0


def test_finercam_alpha_zero_is_gradcam_and_objective_by_hand() -> None:
    model = hidden_head(num_classes=8, seed=3)
    x = images()
    close(explain(model, x, "finercam", {"alpha": 0.0}), explain(model, x, "gradcam"), 1e-5)
    # One comparison class, alpha 1: the weights are the gradient of y_c - y_j, j the closest logit.
    from xaicli.methods.cam_extra import similar_classes

    y = logits(model, x)
    t = y.argmax(1)
    j = similar_classes(y, t, 1)[:, 0]
    assert torch.all(j != t)
    acts = model.features(x)
    out = model.fc(torch.relu(model.hidden(model.pool(acts).flatten(1))))
    (g,) = torch.autograd.grad((out.gather(1, t[:, None]) - out.gather(1, j[:, None])).sum(), acts)
    expected = torch.einsum("bc,bchw->bhw", g.mean((2, 3)), acts.detach()).clamp_min(0)
    close(explain(model, x, "finercam", {"comparisons": 1}), expected, 1e-5)


# --------------------------------------------------------------------------------------------
# Every method: batch-size invariance, the model left as found, the CLI end to end

CASES: list[tuple[str, dict]] = [
    ("ablationcam", {}),
    ("ablationcam", {"max_channels": 4}),
    ("fullgrad", {}),
    ("sscam", {"samples": 3, "std": 0.5}),
    ("iscam", {"samples": 3, "max_channels": 6}),
    ("smoothgradcampp", {"samples": 3}),
    ("kpcacam", {}),
    ("dff", {"concepts": 3, "iterations": 50}),
    ("fem", {}),
    ("shapleycam", {}),
    ("finercam", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_batch_size_invariant(net, method, params) -> None:
    x = images(6, seed=5)
    seeds = torch.arange(6) * 7 + 1
    whole = explain(net, x, method, params, seeds=seeds, batch_size=64)
    ones = torch.cat([explain(net, x[i : i + 1], method, params, seeds=seeds[i : i + 1], batch_size=5)
                      for i in range(6)])
    close(whole, ones, 1e-4)
    assert whole.abs().max() > 0


def _state(model: nn.Module) -> dict:
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "params": [p.detach().clone() for p in model.parameters()],
    }


def _same(a: dict, b: dict) -> bool:
    pa, pb = a["params"], b["params"]
    rest = [k for k in a if k != "params"]
    return all(a[k] == b[k] for k in rest) and all(torch.equal(u, v) for u, v in zip(pa, pb, strict=True))


@pytest.mark.parametrize(("method", "params"), CASES)
def test_model_left_as_found(method, params) -> None:
    model = GapNet(seed=1)
    model.features[1].train()
    model.fc.eval()
    model.features[0].weight.requires_grad_(False)
    before = _state(model)
    explain(model, images(2), method, params)
    assert _same(_state(model), before)
    if get_method(method).needs_layer:  # and on the error path: a layer without a spatial map
        with pytest.raises(MethodError):
            explain_tensor(model, images(2), method, layer="fc", params=params)
        assert _same(_state(model), before)


# Knobs that keep the many-forward methods to a few dozen passes per image in the CLI runs.
KNOBS = {
    "ablationcam": "methods: {ablationcam: {max_channels: 4}}\n",
    "sscam": "methods: {sscam: {samples: 2, max_channels: 4}}\n",
    "iscam": "methods: {iscam: {samples: 2, max_channels: 4}}\n",
}


@pytest.mark.parametrize("method", sorted({m for m, _ in CASES}))
def test_cli_end_to_end(method, tiny_config, image_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from xaicli.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", str(image_dir), "-c", str(tiny_config(method, KNOBS.get(method, ""))), "--out", str(out),
                                   "-q", "--save-maps"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(s) for s in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(r["status"] == "ok" for r in lines)
    for r in lines:
        (e,) = r["explanations"]
        assert e["method"] == method
        raw = np.load(out / e["files"]["map"])
        assert raw.shape[-2:] == (r["height"], r["width"]) and np.isfinite(raw).all()


@pytest.mark.parametrize("method", sorted({m for m, _ in CASES}))
def test_listed_with_cost(method) -> None:
    spec = get_method(method)
    p = build_dataclass(spec.params, {}, f"methods.{method}")
    assert spec.cost_text(p, 16).endswith(("fwd", "bwd"))
    assert method in {s.name for s in all_methods()}
