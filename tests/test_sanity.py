"""The model-parameter randomisation test: similarity measures against SciPy / scikit-image, the
block order, seeded re-initialisation, the cascade on a network trained here, and `xai sanity`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from tests.nets import GapNet
from xaicli.api import explain_tensor
from xaicli.capture import LogitsOnly
from xaicli.cli import app
from xaicli.methods import MethodSpec, NoParams
from xaicli.metrics.similarity import average_ranks, spearman, ssim
from xaicli.sanity import cascade, group_blocks, randomization_blocks, randomize_, verdicts

# --------------------------------------------------------------------------------------------
# Similarities


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 20, 30, generator=g)
    b = a + 0.5 * torch.rand(4, 20, 30, generator=g)
    a[1] = torch.round(a[1] * 4) / 4  # heavy ties
    b[2, :10] = 0  # a block of equal values, as a ReLU'd map has
    b[3] = -b[3]  # anti-correlated
    ours = spearman(a, b)
    for i in range(4):
        ref = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0]
        assert abs(float(ours[i]) - ref) < 1e-6
    ranks = average_ranks(a[1].flatten()[None].double())[0].numpy()
    np.testing.assert_allclose(ranks, stats.rankdata(a[1].flatten().numpy()), atol=1e-9)
    assert float(ours[3]) < -0.8


def test_spearman_constant_maps() -> None:
    zeros = torch.zeros(10)
    ramp = torch.arange(10.0)
    r = spearman(torch.stack([zeros, zeros, ramp]), torch.stack([zeros, ramp, ramp]))
    assert r.tolist() == [1.0, 0.0, 1.0]


def test_ssim_matches_scikit_image() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 24, 40, generator=g)
    b = (a + 0.4 * torch.rand(3, 24, 40, generator=g)) / 1.4
    b[2] = torch.rand(24, 40, generator=g)
    ours = ssim(a, b)
    for i in range(3):
        ref = metrics.structural_similarity(
            a[i].double().numpy(), b[i].double().numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0,
        )
        assert abs(float(ours[i]) - ref) < 1e-5
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Blocks and re-initialisation


class Nested(nn.Module):
    """Containers inside containers, and a custom block with a raw Parameter."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.full((4, 1, 1), 2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(2)])
        self.scale = self.Scale()
        self.unused = nn.Linear(3, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(self.scale(x).mean((2, 3)))


def test_blocks_in_reverse_execution_order() -> None:
    assert randomization_blocks(GapNet(), (32, 32), "cpu") == ["fc", "features.3", "features.0"]
    # Containers are opened; an unused module is left out; a wrapped model names its inner modules.
    blocks = randomization_blocks(LogitsOnly(Nested()), (16, 16), "cpu")
    assert blocks == ["head", "scale", "blocks.1.0", "blocks.0.0", "stem"]
    assert group_blocks(blocks, None) == [(b,) for b in blocks]
    assert group_blocks(blocks, 2) == [("head", "scale"), ("blocks.1.0", "blocks.0.0", "stem")]
    assert group_blocks(blocks, 1) == [tuple(blocks)]
    assert group_blocks(blocks, 9) == [(b,) for b in blocks]


def test_randomize_is_seeded_complete_and_leaves_the_global_rng_alone() -> None:
    net = Nested()
    before = copy.deepcopy(net.state_dict())
    rng = torch.random.get_rng_state()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    randomize_(a, 7)
    randomize_(b, 7)
    assert torch.equal(torch.random.get_rng_state(), rng)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k  # same seed, same weights
        assert not torch.equal(v, before[k]), k  # every parameter re-drawn (the raw one too)
    c = copy.deepcopy(net)
    randomize_(c, 8)
    assert not torch.equal(c.head.weight, a.head.weight)
    # The raw parameter without reset_parameters: N(0, its own std); its std was 0 -> 0.02.
    assert 0.0 < float(a.scale.gain.detach().std()) < 0.1


# --------------------------------------------------------------------------------------------
# The cascade on a network trained in the test


def blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """32x32 noise with one Gaussian blob at a random place; its colour (red vs green) is the class."""
    y = torch.randint(0, 2, (n,), generator=g)
    cx = torch.rand(n, generator=g) * 22 + 5
    cy = torch.rand(n, generator=g) * 22 + 5
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 8.0)
    colour = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])[y]
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=g) + 2 * blob[:, None] * colour[:, :, None, None]
    return x, y, cx, cy


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained() -> tuple[GapNet, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GapNet trained for 40 SGD steps (momentum 0.9) on the blob-colour task (~1 s on one core).
    The update is written out: torch.optim's first use imports torch._dynamo, which takes seconds."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = GapNet(num_classes=2, width=16)
    params = list(net.parameters())
    with torch.no_grad():
        for p in params:
            p.mul_(0.3)
    velocity = [torch.zeros_like(p) for p in params]
    for _ in range(40):
        x, y, _, _ = blobs(32, g)
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
        with torch.no_grad():
            for p, v, gr in zip(params, velocity, grads, strict=True):
                p.sub_(0.05 * v.mul_(0.9).add_(gr))
    net.eval()
    x, y, cx, cy = blobs(16, g)
    return net, x, y, cx, cy


def test_trained_net_learned_the_task_and_gradcam_points_at_the_blob(trained) -> None:
    net, x, y, cx, cy = trained
    with torch.no_grad():
        assert float((net(x).argmax(1) == y).float().mean()) >= 0.9
    m = F.interpolate(explain_tensor(net, x, "gradcam", "features")[:, None], size=(32, 32), mode="bilinear")[:, 0]
    idx = m.flatten(1).argmax(1)
    dist = ((idx % 32 - cx) ** 2 + (idx // 32 - cy) ** 2).sqrt()
    assert float((dist < 4).float().mean()) >= 0.8


def test_gradcam_correlation_drops_under_randomization_and_the_model_is_untouched(trained) -> None:
    net, x, _, _, _ = trained
    saved = copy.deepcopy(net.state_dict())
    flags = {n: m.training for n, m in net.named_modules()}
    res = cascade(net, x, ["gradcam"], "features", seed=0)
    assert res.steps == [(), ("fc",), ("features.3",), ("features.0",)]
    with torch.no_grad():
        assert torch.equal(res.targets, net(x).argmax(1))  # the original prediction, at every step
    sc = res.scores["gradcam"]
    assert sc["spearman_abs"].shape == (4, 16)
    for q in ("spearman_abs", "spearman", "ssim"):
        assert torch.allclose(sc[q][0], torch.ones(16), atol=1e-5), q  # step 0: the exact copy
    full = res.mean("gradcam", "spearman_abs")
    assert full < 0.4, full  # from 1 at step 0 to well below at full randomisation
    assert res.mean("gradcam", "ssim") < 0.4
    assert verdicts(res, 0.5) == {"gradcam": True}
    # The model passed in is unchanged: weights, flags, no gradients, no hooks left.
    for k, v in net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def _input_energy(batch, p):  # a "method" that ignores the model: |x| summed over channels
    return batch.x.abs().sum(1)


INPUT_ENERGY = MethodSpec(name="input_energy", fn=_input_energy, family="gradient", summary="test only",
                          paper="-", space="pixel", grad_of="none", needs_layer=False, signed=False,
                          params=NoParams, cost=lambda p, c: (1, 0))


def test_a_model_independent_map_fails_and_gradcam_passes(trained) -> None:
    net, x, _, _, _ = trained
    res = cascade(net, x[:8], [INPUT_ENERGY, "gradcam"], "features", steps=1, seed=3)
    assert res.steps == [(), ("fc", "features.3", "features.0")]
    assert torch.allclose(res.scores["input_energy"]["spearman_abs"], torch.ones(2, 8), atol=1e-6)
    assert verdicts(res, 0.5) == {"input_energy": False, "gradcam": True}


def test_full_randomization_does_not_depend_on_the_grouping(trained) -> None:
    net, x, _, _, _ = trained
    one = cascade(net, x[:6], ["gradcam"], "features", steps=1, seed=5)
    each = cascade(net, x[:6], ["gradcam"], "features", seed=5)
    for q in ("spearman_abs", "ssim"):
        assert torch.allclose(one.scores["gradcam"][q][-1], each.scores["gradcam"][q][-1], atol=1e-6)
    other = cascade(net, x[:6], ["gradcam"], "features", steps=1, seed=6)
    assert not torch.allclose(one.scores["gradcam"]["spearman_abs"][-1], other.scores["gradcam"]["spearman_abs"][-1])


def test_batching_does_not_change_the_result(trained) -> None:
    from xaicli.methods.batch import Runner

    net, x, _, _, _ = trained
    a = cascade(net, x[:6], ["gradcam"], "features", steps=2, runner=Runner(model=net, budget=6))
    b = cascade(net, x[:6], ["gradcam"], "features", steps=2, runner=Runner(model=net, budget=4))
    assert torch.allclose(a.scores["gradcam"]["spearman_abs"], b.scores["gradcam"]["spearman_abs"], atol=1e-5)


# --------------------------------------------------------------------------------------------
# `xai sanity`


def test_cli_sanity_table_json_and_exit_codes(tiny_config, image_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    cfg = tiny_config("gradcam")
    out = tmp_path / "s"
    res = runner.invoke(app, ["sanity", str(image_dir), "-c", str(cfg), "--steps", "2", "--max-spearman", "1.0",
                              "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "PASS gradcam" in res.output and "rho |map|" in res.output
    rep = json.loads((out / "sanity.json").read_text())
    assert [s["randomized"] for s in rep["steps"]] == [[], ["fc", "features.3"], ["features.0"]]
    assert rep["images"] == sorted(p.name for p in image_dir.iterdir())
    g = rep["methods"]["gradcam"]
    assert len(g["steps"]) == 3 and len(g["per_image"]["spearman_abs"][0]) == 5
    assert abs(g["steps"][0]["spearman_abs"]["mean"] - 1.0) < 1e-5
    assert g["full_randomization"]["spearman_abs"] == pytest.approx(
        float(np.mean(g["per_image"]["spearman_abs"][-1])), abs=1e-5)
    # A bound nothing can meet: the method FAILS and the exit code says so; --json is machine-readable.
    res = runner.invoke(app, ["sanity", str(image_dir), "-c", str(cfg), "--steps", "1", "--max-spearman", "-1",
                              "--max-images", "2", "--json"])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.stdout)  # warnings (no class names for this model) go to stderr
    assert rep["failed_methods"] == ["gradcam"] and len(rep["images"]) == 2
    assert "warning: the model has no class names" in res.stderr
    res = runner.invoke(app, ["sanity", str(image_dir), "-c", str(cfg), "--max-images", "0"])
    assert res.exit_code == 2
