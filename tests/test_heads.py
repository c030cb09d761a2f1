"""Localization heads (xaicli/heads.py): the ACoL head's erasing and branch B, the fusion of both
branches' maps in `xai explain` (by hand, by invariants, against pytorch-grad-cam per branch),
and the backbones a head can go on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tests.nets import GapNet, SmallCnn
from xaicli.api import explain_tensor
from xaicli.config import TargetConfig
from xaicli.engine import Explainer
from xaicli.errors import ModelError
from xaicli.heads import (
    AcolHead,
    CamHead,
    ComplementaryBranch,
    Localizer,
    fuse_maps,
    normalise_maps,
    with_head,
)
from xaicli.layers import resolve_layer
from xaicli.methods import get_method
from xaicli.methods.batch import Runner


def acol_model(seed: int = 0, delta: float = 0.6) -> Localizer:
    torch.manual_seed(seed)
    model = with_head(GapNet(num_classes=3), "acol", classes=4, delta=delta).eval()
    with torch.no_grad():  # distinct, lively branches
        for p in model.head.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    return model


def explainer(model: nn.Module, method: str, layer: str) -> Explainer:
    spec = get_method(method)
    return Explainer(model, [(spec, spec.params())], resolve_layer(model, layer), TargetConfig(), Runner(model, 8))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def by_hand(model: Localizer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's fused map for targets t: max of the normalised ReLU class maps of branch A on
    the features and branch B on the features erased where A's normalised map >= delta."""
    f = model.backbone(x).detach()
    wa, wb = model.head.a.fc.weight[t].detach(), model.head.b.fc.weight[t].detach()
    cam_a = torch.einsum("bc,bchw->bhw", wa, f)
    att = normalise_maps(cam_a)
    erased = f * (att < model.head.delta)[:, None].float()
    cam_b = torch.einsum("bc,bchw->bhw", wb, erased)
    return torch.maximum(normalise_maps(cam_a.clamp_min(0)), normalise_maps(cam_b.clamp_min(0)))


def test_erasing_removes_the_region_where_branch_a_map_is_high(x):
    model = acol_model()
    f = model.backbone(x).detach()
    t = torch.tensor([0, 1, 2, 3, 0])
    keep = model.head.keep_mask(f, t)
    att = normalise_maps(model.head.a.class_maps(f, t))
    assert keep.shape == (5, 1, 16, 16)
    assert torch.equal(keep[:, 0] == 0, att >= 0.6)
    assert (keep == 0).flatten(1).any(1).all()  # the peak itself is always erased
    assert (keep == 1).flatten(1).any(1).all()


def test_training_forward_gives_both_branches_and_eval_gives_branch_a(x):
    model = acol_model()
    labels = torch.tensor([3, 2, 1, 0, 3])
    f = model.backbone(x)
    model.train()
    a, b = model(x, labels)
    model.eval()
    torch.testing.assert_close(model(x), a)
    expected_b = model.head.b(f * model.head.keep_mask(f, labels))
    torch.testing.assert_close(b, expected_b)


def test_complementary_logits_are_each_class_erased_by_its_own_map(x):
    model = acol_model()
    f = model.backbone(x).detach()
    every = model.head.complementary_logits(f)
    for c in range(4):
        t = torch.full((5,), c)
        explicit = model.head.b(f * model.head.keep_mask(f, t))[:, c]
        torch.testing.assert_close(every[:, c], explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ComplementaryBranch(model)(x), every)


def test_fused_cam_is_the_papers_map(x):
    model = acol_model()
    t = torch.tensor([0, 1, 2, 3, 1])
    ex = explainer(model, "cam", "backbone")
    assert ex.acol is model
    ours = ex(x, targets=t).methods[0].maps[0]
    torch.testing.assert_close(ours, by_hand(model, x, t), rtol=1e-5, atol=1e-6)
    # The fused map differs from branch A alone wherever B adds evidence: ACoL is not a no-op here.
    a_only = normalise_maps(torch.einsum("bc,bchw->bhw", model.head.a.fc.weight[t], model.backbone(x)).clamp_min(0))
    assert (ours - a_only.detach()).abs().max() > 0.05


def test_fused_cam_without_the_host_checks_reads_each_branch_classifier(x):
    """The folder run skips the host-side checks after setup's dry run (Explainer.checks): CAM must
    still read branch A's classifier on the model and branch B's on the complementary batch, not
    the last linear layer of the right shape (branch B) for both."""
    model = acol_model()
    t = torch.tensor([0, 1, 2, 3, 1])
    ex = explainer(model, "cam", "backbone")
    ex.checks = False
    torch.testing.assert_close(ex(x, targets=t).methods[0].maps[0], by_hand(model, x, t), rtol=1e-5, atol=1e-6)
    assert model.gap_classifier is model.head.a.fc and ComplementaryBranch(model).gap_classifier is model.head.b.fc


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "xgradcam"])
def test_gradient_cams_fuse_to_the_same_map_as_cam(x, method):
    """Invariant: on each GAP + linear branch Grad-CAM, HiResCAM and XGrad-CAM are CAM / Z, so
    after the per-branch normalisation the fused maps are equal."""
    model = acol_model(seed=1)
    cam = explain_tensor(model, x, "cam", "backbone", target=2)
    other = explain_tensor(model, x, method, "backbone", target=2)
    torch.testing.assert_close(other, cam, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcampp", "layercam", "eigencam", "eigengradcam", "scorecam"])
def test_every_cam_family_method_runs_fused(x, method):
    model = acol_model(seed=2)
    fused = explain_tensor(model, x, method, "backbone", target=1)
    assert fused.shape == (5, 16, 16)
    assert torch.isfinite(fused).all()
    assert fused.min() >= 0 and fused.flatten(1).amax(1).le(1 + 1e-6).all()


def test_at_another_layer_an_acol_model_is_explained_as_its_classifier(x):
    model = acol_model()
    assert explain_tensor(model, x, "gradcam", "backbone.3", target=1).shape == (5, 16, 16)
    assert explainer(model, "gradcam", "backbone.3").acol is None


def test_a_cam_head_model_is_plain_cam(x):
    torch.manual_seed(0)
    model = with_head(GapNet(), "cam", classes=3).eval()
    cam = explain_tensor(model, x, "cam", "backbone", target=2)
    expected = torch.einsum("c,bchw->bhw", model.head.fc.weight[2], model.backbone(x)).clamp_min(0)
    torch.testing.assert_close(cam, expected.detach())


def test_fuse_maps_normalises_each_branch():
    a = torch.tensor([[[0.0, 10.0], [5.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    torch.testing.assert_close(fuse_maps(a, b), torch.tensor([[[1 / 3, 1.0], [0.5, 1.0]]]))
    torch.testing.assert_close(fuse_maps(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)), torch.zeros(1, 2, 2))


# --- pytorch-grad-cam as the reference, one branch at a time -------------------------------------


class ErasedFor(nn.Module):
    """Branch B of an ACoL model for fixed classes, as a plain network pytorch-grad-cam can hook:
    backbone -> erase by branch A's map of ``classes`` -> ``erased`` (identity) -> branch B."""

    def __init__(self, model: Localizer, classes: torch.Tensor) -> None:
        super().__init__()
        self.model, self.classes, self.erased = model, classes, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.backbone(x)
        return self.model.head.b(self.erased(f * self.model.head.keep_mask(f, self.classes)))


@pytest.mark.parametrize("method", ["gradcam", "layercam", "gradcampp"])
def test_each_branch_matches_pytorch_grad_cam(x, method):
    """Branch A is the model as it is; branch B is checked as a plain network that erases for
    fixed classes (ErasedFor), hooked by pytorch-grad-cam at the erased features."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = acol_model(seed=4)
    with torch.no_grad():  # large weights: pytorch-grad-cam's Grad-CAM++ eps becomes negligible
        for branch in (model.head.a, model.head.b):
            branch.fc.weight.mul_(1000)
    t = torch.tensor([1, 0, 3, 2, 1])
    ex = explainer(model, method, "backbone")
    ex.keep_batches = True
    batch_a = ex(x, targets=t).batches[0]
    spec, params = ex.methods[0]
    ours_a, ours_b = spec.fn(batch_a, params), spec.fn(ex._complementary(batch_a), params)

    cls = {"gradcam": pgc.GradCAM, "layercam": pgc.LayerCAM, "gradcampp": pgc.GradCAMPlusPlus}[method]
    targets = [ClassifierOutputTarget(int(c)) for c in t]
    with cls(model, [model.backbone]) as ref_cam:
        ref_a = ref_cam(x, targets=targets)
    branch_b = ErasedFor(model, t).eval()
    with cls(branch_b, [branch_b.erased]) as ref_cam:
        ref_b = ref_cam(x, targets=targets)
    for ours, ref in ((ours_a, ref_a), (ours_b, ref_b)):  # the normalisation and resizing of test_cam.py
        np.testing.assert_allclose(scale_cam_image(scale_cam_image(ours.numpy(), (32, 32))), ref, atol=1e-4, rtol=0)


# --- backbones -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 512), ("mobilenet_v3_small", 576), ("densenet121", 1024)])
def test_torchvision_backbones_get_a_head(name, channels):
    model = with_head(torchvision.models.get_model(name), "cam", classes=3).eval()
    assert model.head.fc.in_features == channels
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_the_embedded_default_gets_a_head():
    from xaicli.config import EMBEDDED_MODEL, EMBEDDED_PREPROCESS
    from xaicli.models import build_model

    loaded = build_model(EMBEDDED_MODEL, EMBEDDED_PREPROCESS)
    model = with_head(loaded.module, "acol", classes=2).eval()
    assert isinstance(model.head, AcolHead) and model.head.a.fc.in_features == 1280
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())  # old classifier gone
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_a_model_without_a_known_feature_extractor_is_refused():
    with pytest.raises(ModelError, match="feature extractor"):
        with_head(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "cam", classes=2)


def test_small_cnn_backbone_keeps_its_feature_names():
    model = with_head(SmallCnn(), "cam", classes=2)
    assert isinstance(model.head, CamHead)
    assert "backbone.0.weight" in model.state_dict()


def test_topk_targets_fuse_per_rank(x):
    model = acol_model(seed=5)
    spec = get_method("cam")
    ex = Explainer(model, [(spec, spec.params())], resolve_layer(model, "backbone"), TargetConfig(mode="topk", k=2),
                   Runner(model, 8))
    res = ex(x)
    assert len(res.methods[0].maps) == 2
    for j in range(2):
        torch.testing.assert_close(res.methods[0].maps[j], by_hand(model, x, res.targets[:, j]), rtol=1e-5, atol=1e-6)


def test_timm_backbones_get_a_head():
    timm = pytest.importorskip("timm")
    model = with_head(timm.create_model("resnet18", pretrained=False), "acol", classes=3).eval()
    assert model.head.a.fc.in_features == 512
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
