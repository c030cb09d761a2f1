"""Every method on CUDA: the same maps as on the CPU, seeded methods reproducible, the CLI end to end.

Skipped without a CUDA device (CI has none); run on a GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_images
from tests.nets import GapNet
from xaicli.api import explain_tensor
from xaicli.cli import app
from xaicli.methods import all_methods

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Methods that draw random numbers on the device (noise, coalitions): CPU and CUDA generators
# differ, so they are checked for reproducibility on CUDA instead of against the CPU.
SAMPLED = {"smoothgrad", "superpixel"}
FAST = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}, "superpixel": {"samples": 32},
        "occlusion": {"window": 8, "stride": 8}}


def _maps(method: str, device: str, seeds: torch.Tensor) -> torch.Tensor:
    net = GapNet().eval().to(device)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    return explain_tensor(net, x, method, layer="features", params=FAST.get(method), seeds=seeds.to(device)).float()


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_method_on_cuda_matches_cpu(method: str) -> None:
    seeds = torch.arange(4)
    gpu = _maps(method, "cuda", seeds)
    assert gpu.is_cuda and torch.isfinite(gpu).all()
    if method in SAMPLED:
        assert torch.equal(gpu, _maps(method, "cuda", seeds))
        return
    cpu = _maps(method, "cpu", seeds)
    scale = cpu.abs().amax().clamp_min(1e-12)
    torch.testing.assert_close(gpu.cpu() / scale, cpu / scale, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cli_on_cuda(tmp_path: Path, precision: str) -> None:
    images = tmp_path / "images"
    write_images(images, 6)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: {source: factory, factory: 'tests.nets:gap_net', kwargs: {num_classes: 5}}\n"
        "preprocess: {resize: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n"
        "target_layer: features\n"
        f"runtime: {{device: cuda, batch_size: 4, workers: 0, precision: {precision}, channels_last: true}}\n"
    )
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["explain", str(images), "-c", str(cfg), "-o", str(out),
                                 "--method", "gradcam,scorecam,saliency", "--metrics", "deletion"])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["device"]["type"] == "cuda" and run["peak_gpu_memory_mb"] > 0
    recs = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["status"] == "ok" for r in recs)
