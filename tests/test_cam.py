"""The CAM family, checked numerically: invariants that hold by construction on a GAP + linear
network, pytorch-grad-cam as the reference, batch independence and hook hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tests.nets import GapNet, HiddenHeadNet
from xaicli.api import explain_tensor
from xaicli.config import TargetConfig
from xaicli.engine import Explainer
from xaicli.errors import LayerError, MethodError
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner
from xaicli.methods.eigen import first_component

CAMS = ["cam", "gradcam", "gradcampp", "hirescam", "xgradcam", "layercam", "eigencam"]


def minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    return (m - lo) / (hi - lo)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- invariants on GAP + linear (metrics.md section 3) ---------------------------------------


def test_cam_equals_gradcam_times_z(gap_net, x):
    """Grad-CAM weights are w_k / Z on a GAP + linear net, so Grad-CAM = CAM / Z exactly."""
    cam = explain_tensor(gap_net, x, "cam", "features", target=3)
    grad = explain_tensor(gap_net, x, "gradcam", "features", target=3)
    z = 16 * 16
    assert cam.shape == (6, 16, 16)
    assert cam.max() > 0
    torch.testing.assert_close(grad * z, cam, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(minmax(grad), minmax(cam), rtol=0, atol=1e-5)


def test_cam_matches_hand_computation(gap_net, x):
    acts = gap_net.features(x)
    w = gap_net.fc.weight[3]
    expected = torch.einsum("c,bchw->bhw", w, acts).clamp_min(0)
    torch.testing.assert_close(explain_tensor(gap_net, x, "cam", "features", target=3), expected.detach())


def test_hirescam_and_xgradcam_collapse_to_gradcam(gap_net, x):
    grad = explain_tensor(gap_net, x, "gradcam", "features", target=1)
    hires = explain_tensor(gap_net, x, "hirescam", "features", target=1)
    torch.testing.assert_close(hires, grad, rtol=1e-4, atol=1e-6)  # both are CAM / Z
    xgrad = explain_tensor(gap_net, x, "xgradcam", "features", target=1)
    # XGrad weights sum_ij A g / sum A = w/Z when sum A != 0 (the eps=1e-7 is negligible here)
    torch.testing.assert_close(xgrad, grad, rtol=1e-4, atol=1e-6)


def test_layercam_is_cam_with_negative_weights_clipped(gap_net, x):
    acts = gap_net.features(x).detach()
    w = gap_net.fc.weight[2].detach()
    expected = torch.einsum("c,bchw->bhw", (w / 256).clamp_min(0), acts).clamp_min(0)
    torch.testing.assert_close(explain_tensor(gap_net, x, "layercam", "features", target=2), expected)


def test_gradcampp_closed_form(gap_net, x):
    """On GAP + linear: channel weight = ReLU(w_k) / (2 + w_k * mean(A_k))."""
    acts = gap_net.features(x).detach()
    w = gap_net.fc.weight[4].detach()
    weights = w.clamp_min(0)[None] / (2 + w[None] * acts.mean((2, 3)))
    expected = torch.einsum("bc,bchw->bhw", weights, acts).clamp_min(0)
    torch.testing.assert_close(explain_tensor(gap_net, x, "gradcampp", "features", target=4), expected,
                               rtol=1e-4, atol=1e-6)


def test_eigencam_rank_one_and_sigma():
    """For centred X = u v^T s, the projection is +-s*u; its norm is sigma_1."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 49, generator=g)
    u = u - u.mean(1, keepdim=True)
    v = torch.nn.functional.normalize(torch.randn(3, 64, generator=g), dim=1)
    mat = u[:, :, None] * v[:, None, :] * 5.0
    proj = first_component(mat)
    for i in range(3):
        cos = torch.dot(proj[i], u[i]) / (proj[i].norm() * u[i].norm())
        assert abs(abs(cos.item()) - 1) < 1e-5
        assert abs(proj[i].norm().item() - 5.0 * u[i].norm().item()) < 1e-3
    # The C x C branch (more locations than channels) agrees with the N x N one.
    tall = torch.randn(2, 80, 16, generator=g)
    proj_tall = first_component(tall)
    centred = tall - tall.mean(1, keepdim=True)
    _, _s, vh = torch.linalg.svd(centred.double())
    ref = (centred.double() @ vh[:, 0, :, None]).squeeze(-1).float()
    for i in range(2):
        assert min((proj_tall[i] - ref[i]).abs().max(), (proj_tall[i] + ref[i]).abs().max()) < 1e-4


def test_eigencam_is_class_agnostic_and_sign_corrected(gap_net, x):
    a = explain_tensor(gap_net, x, "eigencam", "features", target=0)
    b = explain_tensor(gap_net, x, "eigencam", "features", target=3)
    torch.testing.assert_close(a, b)
    raw = explain_tensor(gap_net, x, "eigencam", "features", params={"relu": False})
    flat = raw.flatten(1)
    assert bool((flat.max(1).values.abs() >= flat.min(1).values.abs()).all())


# --- pytorch-grad-cam as the reference --------------------------------------------------------

def pgc_normalise(ours: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam min-max normalises, resizes with cv2 and normalises again (aggregate)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return scale_cam_image(scale_cam_image(ours.numpy(), size))


REFS = {
    "gradcam": "GradCAM",
    "gradcampp": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
}


@pytest.mark.parametrize("method", list(REFS))
@pytest.mark.parametrize("model_name", ["gapnet", "resnet18"])
def test_matches_pytorch_grad_cam(method, model_name, pgc):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    if model_name == "gapnet":
        model, layer, size = GapNet().eval(), "features", (32, 32)
        # Large class weights make the gradients large, so pytorch-grad-cam's Grad-CAM++ eps (1e-6 added
        # to a g^2-scaled denominator) is negligible; our form needs no eps (see gradcampp's docstring).
        with torch.no_grad():
            model.fc.weight.mul_(1000)
    else:
        model, layer, size = torchvision.models.resnet18(num_classes=7).eval(), "layer4", (64, 64)
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    targets = [2, 5, 0] if model_name == "resnet18" else [2, 4, 0]
    ours = torch.cat([explain_tensor(model, x[i:i + 1], method, layer, target=t) for i, t in enumerate(targets)])
    module = model.get_submodule(layer)
    with getattr(pgc, REFS[method])(model, [module]) as ref_cam:
        ref = ref_cam(x, targets=[ClassifierOutputTarget(t) for t in targets])
    tol = 1e-5 if not (method == "gradcampp" and model_name == "resnet18") else 2e-2
    np.testing.assert_allclose(pgc_normalise(ours, size), ref, atol=tol, rtol=0)


@pytest.mark.usefixtures("pgc")
def test_eigencam_matches_pytorch_grad_cam(gap_net, x):
    from pytorch_grad_cam.utils.svd_on_activations import (
        get_2d_projection,
        get_2d_projection_with_sign_correction,
    )

    acts = gap_net.features(x).detach().numpy()
    ours = explain_tensor(gap_net, x, "eigencam", "features")
    np.testing.assert_allclose(ours.numpy(), np.maximum(get_2d_projection_with_sign_correction(acts), 0),
                               atol=1e-4, rtol=1e-4)
    # Against the EigenCAM class itself: equal up to the (arbitrary) SVD sign of each image.
    raw = explain_tensor(gap_net, x, "eigencam", "features", params={"relu": False, "sign_correction": False})
    ref = get_2d_projection(acts)
    for i in range(len(ref)):
        err = min(np.abs(raw[i].numpy() - ref[i]).max(), np.abs(raw[i].numpy() + ref[i]).max())
        assert err < 1e-4 * np.abs(ref[i]).max()


# --- engine-level properties -------------------------------------------------------------------


@pytest.mark.parametrize("method", CAMS)
def test_batch_size_and_neighbours_do_not_matter(gap_net, method):
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    together = explain_tensor(gap_net, x, method, "features")
    alone = torch.cat([explain_tensor(gap_net, x[i:i + 1], method, "features") for i in range(8)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    other = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    mixed = explain_tensor(gap_net, torch.cat([x[:3], other[3:]]), method, "features")
    torch.testing.assert_close(mixed[:3], together[:3], rtol=1e-4, atol=1e-6)


def test_topk_targets_give_one_map_per_rank(gap_net, x):
    spec = get_method("gradcam")
    layer = resolve_layer(gap_net, "features")
    res = Explainer(gap_net, [(spec, spec.params())], layer, TargetConfig(mode="topk", k=3),
                    Runner(gap_net, budget=8))(x)
    assert res.targets.shape == (6, 3)
    assert torch.equal(res.targets, gap_net(x).topk(3, dim=1).indices)
    for j in range(3):
        expected = torch.cat([explain_tensor(gap_net, x[i:i + 1], "gradcam", "features",
                                             target=int(res.targets[i, j])) for i in range(6)])
        torch.testing.assert_close(res.methods[0].maps[j], expected, rtol=1e-4, atol=1e-6)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_hooks_removed_and_state_kept_also_on_error(gap_net, x):
    flags = [p.requires_grad for p in gap_net.parameters()]
    explain_tensor(gap_net, x, "gradcam", "features")
    assert _hooks(gap_net) == 0
    assert all(p.grad is None for p in gap_net.parameters())  # autograd.grad, never backward()
    assert [p.requires_grad for p in gap_net.parameters()] == flags

    class Boom(nn.Module):
        def forward(self, t):
            raise RuntimeError("boom")

    gap_net.fc_backup = gap_net.fc
    gap_net.fc = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        explain_tensor(gap_net, x, "gradcam", "features")
    assert _hooks(gap_net) == 0
    gap_net.fc = gap_net.fc_backup
    gap_net.train()
    explain_tensor(gap_net, x, "gradcam", "features")
    assert gap_net.training and all(m.training for m in gap_net.modules())


def test_frozen_parameters_still_give_gradients(gap_net, x):
    for p in gap_net.parameters():
        p.requires_grad_(False)
    m = explain_tensor(gap_net, x, "gradcam", "features")
    assert m.max() > 0
    assert not any(p.requires_grad for p in gap_net.parameters())


def test_cam_refuses_a_model_without_gap_linear_head(x):
    with pytest.raises(MethodError) as e:
        explain_tensor(HiddenHeadNet().eval(), x, "cam", "features")
    assert "not a linear function of the global average" in e.value.message
    assert "gradcam" in e.value.hint
    vgg = torchvision.models.vgg11(num_classes=4).eval()
    with pytest.raises(MethodError, match="has none"):
        explain_tensor(vgg, torch.randn(1, 3, 64, 64), "cam", "features.19")


def test_non_spatial_layer_is_refused(gap_net, x):
    with pytest.raises(MethodError, match="not a spatial map"):
        explain_tensor(gap_net, x, "gradcam", "fc")


def test_layer_that_does_not_run(x):
    m = GapNet().eval()
    m.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(LayerError, match="did not run"):
        explain_tensor(m, x, "gradcam", "unused")


def test_densenet_in_place_relu_is_consistent():
    """densenet applies F.relu(inplace=True) to the output of `features`: the captured tensor is the
    post-ReLU map and its gradient is taken at the same point, so CAM == Grad-CAM * Z still holds."""
    model = torchvision.models.densenet121(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    cam = explain_tensor(model, x, "cam", "features", target=1)
    grad = explain_tensor(model, x, "gradcam", "features", target=1)
    torch.testing.assert_close(grad * 4, cam, rtol=1e-3, atol=1e-5)  # features are 2x2 at 64x64


def test_bf16_autocast_gives_the_fp32_map(gap_net, x):
    fp32 = explain_tensor(gap_net, x, "gradcam", "features", target=1)
    bf16 = explain_tensor(gap_net, x, "gradcam", "features", target=1, precision="bf16")
    assert bf16.dtype == torch.float32  # maps are computed in fp32 from the captured tensors
    corr = torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1]
    assert corr > 0.99


def test_the_folder_run_checks_the_cam_head_once_at_setup(tiny_config, image_dir, tmp_path, monkeypatch):
    """The dry run refuses a model without a GAP + linear head before any output; the batches of
    a run then skip the check (it reads values back to the host)."""
    from xaicli.config import load_config
    from xaicli.errors import MethodError as Refused
    from xaicli.methods import cam as cam_module
    from xaicli.run import run_explain

    bad = tiny_config("cam").read_text().replace("tests.nets:gap_net", "tests.nets:hidden_head_net")
    (tmp_path / "bad.yaml").write_text(bad.replace("kwargs: {num_classes: 5}", ""))
    with pytest.raises(Refused, match="not a linear function"):
        run_explain(load_config(tmp_path / "bad.yaml"), image_dir, tmp_path / "refused")
    assert not (tmp_path / "refused" / "scores.jsonl").exists()

    seen: list[bool] = []
    original = cam_module._head

    def spy(batch):
        seen.append(batch.checks)
        return original(batch)

    monkeypatch.setattr(cam_module, "_head", spy)
    res = run_explain(load_config(tiny_config("cam")), image_dir, tmp_path / "ok")
    assert res.exit_code == 0 and seen[0] is True and not any(seen[1:]) and len(seen) > 1


# --- CAM on 1x1-convolution heads (Network in Network, SqueezeNet) -----------------------------


def test_cam_on_a_nin_head_averages_to_the_logit(x):
    """A 1x1 conv to the classes then GAP: mean_ij CAM_c + b_c = logit_c at the conv's input, and at
    its output (one channel per class) the map is that channel, whose mean is the logit itself."""
    from tests.nets import NinNet

    model = NinNet().eval()
    logits = model(x).detach()
    for t in range(5):
        at_input = explain_tensor(model, x, "cam", "features", target=t, params={"relu": False})
        torch.testing.assert_close(at_input.mean((1, 2)) + model.classifier.bias[t].detach(), logits[:, t],
                                   rtol=1e-5, atol=1e-5)
        at_output = explain_tensor(model, x, "cam", "classifier", target=t, params={"relu": False})
        torch.testing.assert_close(at_output.mean((1, 2)), logits[:, t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(at_output, model.classifier(model.features(x))[:, t].detach())
    # Grad-CAM on the same layer is CAM / Z, as on GAP + linear.
    grad = explain_tensor(model, x, "gradcam", "features", target=2)
    torch.testing.assert_close(grad * 16 * 16, explain_tensor(model, x, "cam", "features", target=2),
                               rtol=1e-4, atol=1e-5)


def test_cam_on_squeezenet_is_the_class_channel_before_pooling():
    """squeezenet1_1: classifier = dropout, 1x1 conv, ReLU, GAP. The default layer (the pooling's
    input) has one channel per class; the map is that channel and its spatial mean is the logit."""
    model = torchvision.models.squeezenet1_1(num_classes=6).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(7))
    logits = model(x).detach()
    for t in (0, 4):
        m = explain_tensor(model, x, "cam", target=t)  # auto layer: classifier.3:input
        torch.testing.assert_close(m.mean((1, 2)), logits[:, t], rtol=1e-5, atol=1e-6)
        assert m.shape[-2:] == (5, 5)
    # Before the head's ReLU the logits are not linear in the pooled map: a clear refusal with the way out.
    with pytest.raises(MethodError, match="not a linear function") as e:
        explain_tensor(model, x, "cam", "features", target=0)
    assert "whose channels are the classes" in e.value.hint


# --- counterfactual explanations ----------------------------------------------------------------

LINEAR_IN_G = ["cam", "gradcam", "hirescam", "xgradcam"]


@pytest.mark.parametrize("method", LINEAR_IN_G)
def test_counterfactual_is_the_negated_map_before_the_relu(gap_net, x, method):
    """Methods whose weights are linear in the gradient (or CAM's weights): -y_c gives exactly the
    negated map; with the ReLU it keeps the regions that speak against the class."""
    plain = explain_tensor(gap_net, x, method, "features", target=2, params={"relu": False})
    counter = explain_tensor(gap_net, x, method, "features", target=2,
                             params={"relu": False, "counterfactual": True})
    torch.testing.assert_close(counter, -plain)
    assert plain.min() < 0 < plain.max()  # both signs present, so the check has teeth
    clipped = explain_tensor(gap_net, x, method, "features", target=2, params={"counterfactual": True})
    torch.testing.assert_close(clipped, (-plain).clamp_min(0))


def test_counterfactual_layercam_and_gradcampp_use_the_negated_gradient(gap_net, x):
    """On GAP + linear (G = w / Z): Layer-CAM keeps ReLU(-w / Z); Grad-CAM++ uses the closed form with -w."""
    acts = gap_net.features(x).detach()
    w = -gap_net.fc.weight[1].detach()
    layer = torch.einsum("c,bchw->bhw", (w / 256).clamp_min(0), acts).clamp_min(0)
    torch.testing.assert_close(explain_tensor(gap_net, x, "layercam", "features", target=1,
                                              params={"counterfactual": True}), layer)
    pp_weights = w.clamp_min(0)[None] / (2 + w[None] * acts.mean((2, 3)))
    pp = torch.einsum("bc,bchw->bhw", pp_weights, acts).clamp_min(0)
    torch.testing.assert_close(explain_tensor(gap_net, x, "gradcampp", "features", target=1,
                                              params={"counterfactual": True}), pp, rtol=1e-4, atol=1e-6)


def test_counterfactual_share_goes_to_the_scores(gap_net, x):
    spec = get_method("gradcam")
    p = spec.params(counterfactual=True)
    layer = resolve_layer(gap_net, "features")
    res = Explainer(gap_net, [(spec, p)], layer, TargetConfig(mode="index", index=2), Runner(gap_net, 8))(x)
    share = res.methods[0].extras[0]["counterfactual_share"]
    raw = explain_tensor(gap_net, x, "gradcam", "features", target=2, params={"relu": False})
    expected = (-raw).clamp_min(0).sum((1, 2)) / raw.abs().sum((1, 2))
    torch.testing.assert_close(share, expected)
    assert bool(((share >= 0) & (share <= 1)).all()) and bool(((share > 0) & (share < 1)).any())


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "gradcampp"])
def test_counterfactual_matches_pytorch_grad_cam_on_the_negated_score(method, pgc):
    """pytorch-grad-cam explains any scalar of the output: -logit_c is the counterfactual target."""
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    targets = [3, 5]
    ours = torch.cat([explain_tensor(model, x[i:i + 1], method, "layer4", target=t,
                                     params={"counterfactual": True}) for i, t in enumerate(targets)])
    refs = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "layercam": "LayerCAM", "gradcampp": "GradCAMPlusPlus"}
    with getattr(pgc, refs[method])(model, [model.layer4]) as ref_cam:
        ref = ref_cam(x, targets=[lambda out, t=t: -out[..., t] for t in targets])
    tol = 2e-2 if method == "gradcampp" else 1e-5
    np.testing.assert_allclose(pgc_normalise(ours, (64, 64)), ref, atol=tol, rtol=0)


# --- Eigen-CAM's further components -------------------------------------------------------------


@pytest.mark.parametrize("component", [1, 2, 3])
def test_eigencam_component_matches_an_independent_svd(gap_net, x, component):
    """The N-th component is X v_N (X the centred (h*w, C) activations, v_N from numpy's SVD),
    sign-corrected by the |min| > |max| rule; both Gram branches (N < C and N > C locations)."""
    for layer, size in (("features", 32), ("features", 4)):
        xs = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(component))
        acts = gap_net.features(xs).detach().double().numpy()
        b, c, h, w = acts.shape
        ours = explain_tensor(gap_net, xs, "eigencam", layer, params={"relu": False, "component": component})
        for i in range(b):
            mat = acts[i].reshape(c, h * w).T
            mat = mat - mat.mean(0)
            _, _, vt = np.linalg.svd(mat, full_matrices=False)
            ref = (mat @ vt[component - 1]).reshape(h, w)
            if np.abs(ref.min()) > np.abs(ref.max()):
                ref = -ref
            np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_eigencam_components_are_orthogonal_and_too_many_is_refused(gap_net, x):
    first = explain_tensor(gap_net, x, "eigencam", "features", params={"relu": False})
    torch.testing.assert_close(first, explain_tensor(gap_net, x, "eigencam", "features",
                                                     params={"relu": False, "component": 1}), rtol=0, atol=0)
    second = explain_tensor(gap_net, x, "eigencam", "features", params={"relu": False, "component": 2})
    cos = (first.flatten(1) * second.flatten(1)).sum(1) / (first.flatten(1).norm(dim=1) * second.flatten(1).norm(dim=1))
    assert cos.abs().max() < 1e-4  # u_1 and u_2 are orthogonal
    assert bool((first.flatten(1).norm(dim=1) >= second.flatten(1).norm(dim=1)).all())  # sigma_1 >= sigma_2
    with pytest.raises(MethodError, match="component 17"):
        explain_tensor(gap_net, x, "eigencam", "features", params={"component": 17})
