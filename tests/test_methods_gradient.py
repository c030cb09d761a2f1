"""Gradient methods: against Captum on the same model, input and class; invariants that hold by
construction; batch-size invariance; the model left exactly as found; the CLI end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from tests.nets import GapNet, HiddenHeadNet
from xaicli.api import explain_tensor
from xaicli.config import TargetConfig, build_dataclass
from xaicli.engine import Explainer
from xaicli.errors import ConfigError, MethodError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Batch, PixelSpace, Runner
from xaicli.methods.gradient import (
    IGParams,
    ig_baseline,
    input_gradients,
    integrated_attributions,
    quadrature,
)
from xaicli.methods.relu_rules import relu_rule

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
NEW_METHODS = ["saliency", "deconvnet", "guided_backprop", "guided_gradcam", "smoothgrad", "integrated_gradients"]


def close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    """Equal up to ``rel`` of the larger tensor's peak (float32 sums in different orders)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max diff {err:.3g} vs peak {scale:.3g}"


def inputs(b: int = 4, seed: int = 0, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


def batch_of(model: nn.Module, x: Tensor, method: str, params: dict | None = None, layer: str | None = None,
             seeds: Tensor | None = None, budget: int = 64) -> tuple[Batch, Tensor, dict]:
    """The Batch a method sees (shared pass done) plus its map and extras, for the predicted class."""
    spec = get_method(method)
    p = build_dataclass(spec.params, params or {}, "test")
    ref = resolve_layer(model, layer) if layer else None
    ex = Explainer(model, [(spec, p)], ref, TargetConfig(), Runner(model, budget), keep_batches=True,
                   pixels=PixelSpace(MEAN, STD))
    res = ex(x, seeds)
    return res.batches[0], res.methods[0].maps[0], res.methods[0].extras[0]


class PlainNet(nn.Module):
    """Distinct, out-of-place ReLU modules, a hidden head: a network Captum hooks without caveats."""

    def __init__(self, act: type[nn.Module] = nn.ReLU, seed: int = 1, scale: float = 0.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), act(), nn.Conv2d(6, 8, 3, stride=2, padding=1), act())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(8, 12), act(), nn.Linear(12, 5))
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class SharedReluNet(PlainNet):
    """PlainNet's weights with one in-place ReLU module called at every activation (as in ResNet blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        h = self.relu(f[2](self.relu(f[0](x))))
        h = self.relu(self.head[0](self.pool(h).flatten(1)))
        return self.head[2](h)


class LinearConvNet(nn.Module):
    """No nonlinearity at all: conv -> average pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(nn.functional.avg_pool2d(self.conv(x), 8).flatten(1))


# --------------------------------------------------------------------------------------------
# Against Captum


def test_saliency_matches_captum(captum_attr: ModuleType) -> None:
    model, x = PlainNet().eval(), inputs()
    batch, m_abs, _ = batch_of(model, x, "saliency")
    t = batch.targets
    ref_signed = captum_attr.Saliency(model).attribute(x.clone(), target=t, abs=False)
    ref_abs = captum_attr.Saliency(model).attribute(x.clone(), target=t, abs=True)
    close(batch.input_grad, ref_signed)
    close(m_abs, ref_abs.amax(1))  # Simonyan: max over channels of |gradient|
    _, m_signed, _ = batch_of(model, x, "saliency", {"render": "diverging"})
    close(m_signed, ref_signed.sum(1))
    assert (m_signed < 0).any() and (m_signed > 0).any()


@pytest.mark.parametrize(("method", "rule", "captum_cls"), [
    ("guided_backprop", "guided", "GuidedBackprop"),
    ("deconvnet", "deconvnet", "Deconvolution"),
])
@pytest.mark.parametrize("net", ["plain", "gap_inplace"])
def test_relu_rules_match_captum(
    method: str, rule: str, captum_cls: str, net: str, captum_attr: ModuleType
) -> None:
    model = (PlainNet() if net == "plain" else GapNet()).eval()
    x = inputs()
    batch, m, _ = batch_of(model, x, method, {"render": "diverging"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(captum_attr, captum_cls)(model).attribute(x.clone(), target=batch.targets)
    ours = input_gradients(batch, x, batch.targets, rule)  # type: ignore[arg-type]
    close(ours, ref)
    close(m, ref.sum(1))
    # The rule changed something: the map is not the plain gradient.
    assert (ours - batch.runner.input_gradients(x, batch.targets)[0]).abs().max() > 1e-3 * ref.abs().max()


def test_guided_gradcam_matches_captum_bilinear(captum_attr: ModuleType) -> None:
    model, x = GapNet().eval(), inputs()
    batch, m, _ = batch_of(model, x, "guided_gradcam", {"render": "diverging"}, layer="features")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.GuidedGradCam(model, model.features).attribute(
            x.clone(), target=batch.targets, interpolate_mode="bilinear"
        )
    close(m, ref.sum(1))
    _, m_mag, _ = batch_of(model, x, "guided_gradcam", layer="features")
    close(m_mag, ref.abs().amax(1))


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_integrated_gradients_matches_captum(rule: str, captum_attr: ModuleType) -> None:
    model, x = PlainNet().eval(), inputs(3)
    steps = 20
    batch, m, extras = batch_of(model, x, "integrated_gradients", {"steps": steps, "rule": rule}, budget=16)
    black = PixelSpace(MEAN, STD).to_model(torch.zeros_like(x))
    ig = captum_attr.IntegratedGradients(model)
    ref, delta = ig.attribute(x.clone(), baselines=black, target=batch.targets, n_steps=steps, method=rule,
                              return_convergence_delta=True)
    ours = integrated_attributions(batch, ig_baseline(batch, build_dataclass(IGParams, {}, "t")),
                                   build_dataclass(IGParams, {"steps": steps, "rule": rule}, "t"))
    if rule == "riemann_trapezoid":
        # Captum weights the trapezoid's n points by 1/n (halved at the ends): they sum to (n-1)/n, so
        # its integral is short by that factor. Ours uses the trapezoid rule's 1/(n-1) spacing.
        ref = ref * steps / (steps - 1)
        delta = ref.sum((1, 2, 3)) - (model(x) - model(black)).gather(1, batch.targets[:, None])[:, 0].detach()
    close(ours, ref.float(), 1e-5)
    close(m, ref.sum(1).float(), 1e-5)
    # Captum's convergence delta is the same completeness gap.
    close(extras["completeness_gap"], delta.float(), 1e-4)


def test_black_baseline_is_the_normalised_black_image() -> None:
    x = inputs(2)
    batch, _, _ = batch_of(PlainNet().eval(), x, "integrated_gradients", {"steps": 2})
    base = ig_baseline(batch, IGParams())
    expected = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    assert torch.allclose(base, expected.view(1, 3, 1, 1).expand_as(x))


# --------------------------------------------------------------------------------------------
# Invariants


def test_ig_completeness_within_one_percent_with_64_steps() -> None:
    """On the tiny GAP network, for every baseline with the default rule. (The error of any rule on a
    ReLU network falls only like 1/steps: the integrand is piecewise constant.)"""
    model, x = GapNet().eval(), inputs(4, seed=5)
    for baseline in ("black", "blurred", "uniform"):
        params = {"steps": 64, "baseline": baseline}
        batch, m, extras = batch_of(model, x, "integrated_gradients", params, seeds=torch.arange(4))
        base = ig_baseline(batch, build_dataclass(IGParams, params, "t"))
        diff = model(x).gather(1, batch.targets[:, None])[:, 0] - model(base).gather(1, batch.targets[:, None])[:, 0]
        assert diff.abs().min() > 0.1  # a real change of the score to attribute
        assert ((m.sum((1, 2)) - diff).abs() < 0.01 * diff.abs()).all(), (baseline, m.sum((1, 2)), diff)
        d = diff.detach()
        assert ((extras["completeness_gap"] - (m.sum((1, 2)) - d)).abs() < 1e-5 * d.abs()).all()
        close(extras["completeness_rel"], extras["completeness_gap"] / d.abs(), 1e-5)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_right", "riemann_trapezoid"])
def test_ig_of_a_linear_model_is_delta_times_weight(rule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    x = inputs(3, size=8)
    batch, m, extras = batch_of(model, x, "integrated_gradients", {"steps": 7, "rule": rule, "reduce": "sum"})
    base = ig_baseline(batch, IGParams())
    w = model[1].weight.detach()[batch.targets].view(3, 3, 8, 8)
    attr = integrated_attributions(batch, base, build_dataclass(IGParams, {"steps": 7, "rule": rule}, "t"))
    close(attr, (x - base) * w, 1e-6)
    close(m, ((x - base) * w).sum(1), 1e-6)
    assert extras["completeness_gap"].abs().max() < 1e-4


def test_ig_with_the_input_as_baseline_is_zero() -> None:
    model, x = PlainNet().eval(), inputs(1)
    _, m, extras = batch_of(model, x, "integrated_gradients", {"baseline": "image", "image_tensor": x[0], "steps": 8})
    assert torch.equal(m, torch.zeros_like(m))
    assert extras["completeness_gap"].abs().max() < 1e-6


def test_smoothgrad_sigma_zero_equals_the_gradient() -> None:
    model, x = PlainNet().eval(), inputs()
    batch, m, _ = batch_of(model, x, "smoothgrad", {"sigma": 0.0, "samples": 20, "render": "diverging"},
                           seeds=torch.arange(4))
    grad = batch.runner.input_gradients(x, batch.targets)[0]
    close(m, grad.sum(1), 1e-5)
    _, sq, _ = batch_of(model, x, "smoothgrad", {"sigma": 0.0, "samples": 20, "variant": "squared",
                                                 "reduce": "sum"}, seeds=torch.arange(4))
    close(sq, grad.square().sum(1), 1e-5)
    _, var, _ = batch_of(model, x, "smoothgrad", {"sigma": 0.0, "samples": 20, "variant": "vargrad"},
                         seeds=torch.arange(4))
    assert var.abs().max() <= 1e-6 * grad.square().max()
    guided = input_gradients(batch, x, batch.targets, "guided")
    _, mg, _ = batch_of(model, x, "smoothgrad", {"sigma": 0.0, "samples": 3, "base": "guided_backprop",
                                                 "render": "diverging"}, seeds=torch.arange(4))
    close(mg, guided.sum(1), 1e-5)


def test_smoothgrad_variants_against_explicit_noise() -> None:
    """mean / squared / vargrad from the same noise as each image's generator draws, by hand."""
    model, x = PlainNet().eval(), inputs(2)
    n, sigma = 20, 0.2
    seeds = torch.tensor([11, 42])
    batch, _, _ = batch_of(model, x, "saliency", seeds=seeds)
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    grads = []
    for i, g in enumerate(batch.generators()):
        noise = torch.cat([torch.randn((k, 3, 32, 32), generator=g) for k in (16, 4)])
        xs = x[i] + noise * sigma * span[i]
        grads.append(batch.runner.input_gradients(xs, batch.targets[i].repeat(n))[0])
    gs = torch.stack(grads)  # (B, n, C, H, W)
    expected = {"mean": gs.mean(1), "squared": gs.square().mean(1), "vargrad": gs.var(1, unbiased=False)}
    for variant, ref in expected.items():
        _, m, _ = batch_of(model, x, "smoothgrad", {"sigma": sigma, "samples": n, "variant": variant,
                                                    "reduce": "sum", "render": "diverging"}, seeds=seeds)
        close(m, ref.sum(1), 1e-4)
    # Captum's NoiseTunnel computes the same statistics (its own noise): equal in expectation only,
    # so here only the smoothing itself is checked: noise changes the map.
    _, plain, _ = batch_of(model, x, "saliency", {"render": "diverging"})
    assert (expected["mean"].sum(1) - plain).abs().max() > 1e-3 * plain.abs().max()


def test_relu_rules_on_a_network_without_relu_equal_the_gradient() -> None:
    model, x = LinearConvNet().eval(), inputs()
    for method in ("guided_backprop", "deconvnet"):
        batch, m, _ = batch_of(model, x, method, {"render": "diverging"})
        close(m, batch.runner.input_gradients(x, batch.targets)[0].sum(1), 1e-6)


def test_relu_rules_on_w_relu_x() -> None:
    """y = w^T ReLU(x): guided backprop = ReLU(w) * 1[x > 0], DeconvNet = ReLU(w)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(3 * 4 * 4, 2, bias=False)).eval()
    x = inputs(3, size=4)
    batch, _, _ = batch_of(model, x, "saliency")
    w = model[2].weight.detach()[batch.targets].view(3, 3, 4, 4)
    assert (w < 0).any() and (x < 0).any()
    close(input_gradients(batch, x, batch.targets, "guided"), w.clamp_min(0) * (x > 0), 1e-7)
    close(input_gradients(batch, x, batch.targets, "deconvnet"), w.clamp_min(0), 1e-7)
    close(batch.input_grad, w * (x > 0), 1e-7)


def test_shared_inplace_relu_module_gets_the_rule_at_every_call() -> None:
    x = inputs()
    plain = PlainNet().eval()
    shared = SharedReluNet().eval()
    shared.load_state_dict(plain.state_dict(), strict=False)
    assert torch.equal(plain(x), shared(x))
    for method in ("guided_backprop", "deconvnet"):
        _, a, _ = batch_of(plain, x, method, {"render": "diverging"})
        _, b, _ = batch_of(shared, x, method, {"render": "diverging"})
        close(a, b, 1e-6)


def test_guided_backprop_on_torchvision_resnet18(captum_attr: ModuleType) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=7).eval()
    x = inputs(2)
    before = snapshot(model)
    batch, m, _ = batch_of(model, x, "guided_backprop", {"render": "diverging"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = captum_attr.GuidedBackprop(model).attribute(x.clone(), target=batch.targets)
    close(m, ref.sum(1), 1e-5)
    assert snapshot(model) == before


def _relu6_reference(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """Guided backprop through backward hooks on each ReLU6 (relu of its masked gradient)."""
    handles = [m.register_full_backward_hook(lambda mod, gi, go: (gi[0].clamp_min(0),))
               for m in model.modules() if isinstance(m, nn.ReLU6)]
    try:
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi).gather(1, t[:, None]).sum(), xi)
    finally:
        for h in handles:
            h.remove()
    return g


def test_guided_backprop_with_relu6() -> None:
    model, x = PlainNet(act=nn.ReLU6, scale=1.5).eval(), inputs() * 3
    pre = model.features[0](x)
    assert (pre > 6).any() and (pre < 0).any()  # both clips are active
    batch, m, _ = batch_of(model, x, "guided_backprop", {"render": "diverging"})
    ref = _relu6_reference(model, x, batch.targets)
    ours = input_gradients(batch, x, batch.targets, "guided")
    close(ours, ref, 1e-5)
    close(m, ref.sum(1), 1e-5)


# --------------------------------------------------------------------------------------------
# Errors users can hit


def test_functional_relu_is_refused_with_the_reason() -> None:
    model = HiddenHeadNet().eval()
    before = snapshot(model)
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(MethodError, match=r"calls torch\.relu.*nn\.ReLU / nn\.ReLU6 modules"):
            batch_of(model, inputs(2), method)
    assert snapshot(model) == before


class ScaledReLU(nn.ReLU):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


def test_relu_subclass_with_its_own_forward_is_not_rewritten_but_reported() -> None:
    model = PlainNet(act=ScaledReLU).eval()
    with pytest.raises(MethodError, match=r"calls F\.relu"):
        batch_of(model, inputs(2), "guided_backprop")


def test_model_without_relu_modules_but_other_activations_is_refused() -> None:
    model = PlainNet(act=nn.SiLU).eval()
    with pytest.raises(MethodError, match=r"no nn\.ReLU / nn\.ReLU6 modules.*SiLU"):
        batch_of(model, inputs(2), "guided_backprop")


def test_ig_knob_errors() -> None:
    spec = get_method("integrated_gradients")
    with pytest.raises(ConfigError, match="needs an image path"):
        build_dataclass(spec.params, {"baseline": "image"}, "methods.integrated_gradients")
    with pytest.raises(ConfigError, match="set baseline: image"):
        build_dataclass(spec.params, {"image": "a.png"}, "methods.integrated_gradients")
    with pytest.raises(ConfigError, match="steps: must be positive"):
        build_dataclass(spec.params, {"steps": 0}, "methods.integrated_gradients")
    with pytest.raises(ConfigError, match="rule"):
        build_dataclass(spec.params, {"rule": "simpson"}, "methods.integrated_gradients")
    with pytest.raises(ConfigError, match="image_tensor"):
        build_dataclass(spec.params, {"baseline": "image", "image_tensor": "x.png"}, "methods.integrated_gradients")


def test_quadrature_weights_integrate_polynomials() -> None:
    for rule, degree in (("gausslegendre", 9), ("riemann_trapezoid", 1), ("riemann_middle", 1)):
        a, w = (np.array(v) for v in quadrature(rule, 5))
        for d in range(degree + 1):
            assert abs((w * a**d).sum() - 1 / (d + 1)) < 1e-12, (rule, d)


# --------------------------------------------------------------------------------------------
# Batch-size invariance and model state


CASES = {
    "saliency": {},
    "deconvnet": {},
    "guided_backprop": {"render": "diverging"},
    "guided_gradcam": {},
    "smoothgrad": {"samples": 18, "variant": "vargrad"},  # two noise groups (16 + 2)
    "integrated_gradients": {"steps": 8, "baseline": "uniform"},
}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_batch_size_invariant(method: str) -> None:
    model, x = GapNet().eval(), inputs(8, seed=2, size=16)
    seeds = torch.arange(100, 108)
    kw = {"layer": "features"} if method == "guided_gradcam" else {}
    full = explain_tensor(model, x, method, params=CASES[method], seeds=seeds, batch_size=5, **kw)
    single = torch.cat([
        explain_tensor(model, x[i : i + 1], method, params=CASES[method], seeds=seeds[i : i + 1], batch_size=64, **kw)
        for i in range(8)
    ])
    close(full, single, 1e-5)
    assert full.abs().max() > 0


def snapshot(model: nn.Module) -> tuple:
    mods = []
    for name, m in model.named_modules(remove_duplicate=False):
        mods.append((
            name, id(m), type(m), getattr(m, "inplace", None), m.training,
            dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
            dict(m._backward_pre_hooks), m.__dict__.get("forward", "<class forward>"),
        ))
    params = [(n, id(p), p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    return tuple(mods), tuple(params)


def odd_state_model() -> GapNet:
    """Mixed training flags, a frozen parameter and a user's forward hook already present."""
    model = GapNet()
    model.train()
    model.features[0].eval()
    model.fc.weight.requires_grad_(False)
    model.features[1].register_forward_hook(lambda m, a, o: None)
    return model


@pytest.mark.parametrize("method", NEW_METHODS)
def test_model_left_as_found(method: str) -> None:
    model = odd_state_model()
    kw = {"layer": "features"} if method == "guided_gradcam" else {}
    before = snapshot(model)
    explain_tensor(model, inputs(2, size=16), method, params=CASES[method], seeds=torch.arange(2), **kw)
    assert snapshot(model) == before

    # An error inside the method's own passes (the second forward; the first for saliency).
    calls = {"n": 0}
    fail_at = 1 if method == "saliency" else 2

    def boom(m: nn.Module, args: tuple, out: Tensor) -> None:
        calls["n"] += 1
        if calls["n"] >= fail_at:
            raise RuntimeError("boom")

    handle = model.fc.register_forward_hook(boom)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        explain_tensor(model, inputs(2, size=16), method, params=CASES[method], seeds=torch.arange(2), **kw)
    assert calls["n"] == fail_at
    assert snapshot(model) == before
    handle.remove()


def test_relu_rule_restores_after_error_inside_the_block() -> None:
    model = SharedReluNet()
    before = snapshot(model)
    with pytest.raises(ValueError), relu_rule(model, "guided") as n:
        assert n == 4 and "forward" in model.relu.__dict__  # three unused from PlainNet + the shared one
        raise ValueError
    assert snapshot(model) == before
    assert "forward" not in model.relu.__dict__


# --------------------------------------------------------------------------------------------
# xai methods and the CLI end to end


def test_costs_follow_the_knobs() -> None:
    assert get_method("saliency").cost_text() == "1 fwd + 1 bwd"
    assert get_method("guided_backprop").cost_text() == "2 fwd + 1 bwd"
    assert get_method("deconvnet").cost_text() == "2 fwd + 1 bwd"
    assert get_method("guided_gradcam").cost_text() == "2 fwd + 2 bwd"
    sg = get_method("smoothgrad")
    assert sg.cost_text(build_dataclass(sg.params, {"samples": 10}, "t")) == "11 fwd + 10 bwd"
    ig = get_method("integrated_gradients")
    assert ig.cost_text(build_dataclass(ig.params, {"steps": 64}, "t")) == "66 fwd + 64 bwd"


def test_runner_passes_match_the_cost() -> None:
    """Count the model's forwards for smoothgrad and IG: the registry's cost is the truth."""
    model, x = GapNet().eval(), inputs(1)
    for method, params in (("smoothgrad", {"samples": 7}), ("integrated_gradients", {"steps": 9}),
                           ("guided_backprop", {}), ("deconvnet", {}), ("guided_gradcam", {}), ("saliency", {})):
        calls = {"n": 0}
        h = model.register_forward_hook(lambda m, a, o, c=calls: c.__setitem__("n", c["n"] + 1))
        kw = {"layer": "features"} if method == "guided_gradcam" else {}
        try:
            explain_tensor(model, x, method, params=params, seeds=torch.arange(1), batch_size=1, **kw)
        finally:
            h.remove()
        spec = get_method(method)
        fwd, _ = spec.cost(build_dataclass(spec.params, params, "t"), None)
        assert calls["n"] == fwd, (method, calls["n"], fwd)


def _run_cli(tmp_path: Path, cfg: Path, image_dir: Path, out: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from xaicli.cli import app

    res = CliRunner().invoke(app, ["explain", str(image_dir), "--config", str(cfg), "--out", str(tmp_path / out), "-q"])
    return res.exit_code, res.output


@pytest.mark.parametrize("method", NEW_METHODS)
def test_cli_end_to_end(method: str, tmp_path: Path, image_dir: Path, tiny_config) -> None:
    extra = {
        "smoothgrad": "methods: {smoothgrad: {samples: 8}}\n",
        "integrated_gradients": "methods: {integrated_gradients: {steps: 16}}\n",
    }.get(method, "")
    code, output = _run_cli(tmp_path, tiny_config(method, extra), image_dir, "out")
    assert code == 0, output
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    for r in records:
        (e,) = r["explanations"]
        assert e["method"] == method
        assert (out / e["files"]["overlay"]).is_file()
        if method == "integrated_gradients":
            assert isinstance(e["completeness_gap"], float)
            assert abs(e["completeness_rel"]) < 0.05
    run = json.loads((out / "run.json").read_text())
    assert run["methods"][0]["name"] == method


def test_cli_ig_with_a_baseline_image(tmp_path: Path, image_dir: Path, tiny_config) -> None:
    base = tmp_path / "gray.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(base)
    extra = f"methods: {{integrated_gradients: {{baseline: image, image: {base}, steps: 8}}}}\n"
    code, output = _run_cli(tmp_path, tiny_config("integrated_gradients", extra), image_dir, "out")
    assert code == 0, output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    params = run["methods"][0]["params"]
    assert params["image"] == str(base) and "image_tensor" not in params
    # A missing baseline file is a config error (exit 2) before any image is processed.
    extra = f"methods: {{integrated_gradients: {{baseline: image, image: {tmp_path / 'nope.png'}}}}}\n"
    code, output = _run_cli(tmp_path, tiny_config("integrated_gradients", extra), image_dir, "out2")
    assert code == 2 and "nope.png" in output
