"""Shared fixtures: tiny seeded networks, seeded images, temporary folders and configs."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from tests.nets import GapNet

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"
BROKEN = Path(__file__).resolve().parent / "data" / "broken"

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture
def gap_net() -> GapNet:
    return GapNet().eval()


# The peer libraries serve as references. Each reference test asks for its peer through one of these
# fixtures, so a missing peer skips that test alone, never the invariant tests of its file.


@pytest.fixture
def pgc() -> ModuleType:
    """pytorch-grad-cam; the test is skipped without it."""
    return pytest.importorskip("pytorch_grad_cam")


@pytest.fixture
def captum_attr() -> ModuleType:
    """captum.attr; the test is skipped without it."""
    return pytest.importorskip("captum.attr")


def write_images(folder: Path, n: int = 5, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """Seeded colourful images of mixed sizes and formats: a blob on a gradient."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or [(48, 64), (64, 48), (40, 40), (70, 50), (33, 45)]
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        blob = np.exp(-(((yy - cy) / (0.15 * h)) ** 2 + ((xx - cx) / (0.15 * w)) ** 2))
        img = np.stack([blob * 255, xx / w * 255, rng.uniform(0, 255, (h, w))], -1).astype(np.uint8)
        ext = ".png" if i % 2 == 0 else ".jpg"
        p = folder / f"img{i:02d}{ext}"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    write_images(d)
    return d


TINY_CONFIG = """
model:
  source: factory
  factory: tests.nets:gap_net
  kwargs: {{num_classes: 5}}
preprocess: {{resize: [32, 32], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}}
target_layer: features
method: {method}
runtime: {{device: cpu, batch_size: 4, workers: 0}}
"""


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write a config for the tiny GAP network (fast end-to-end runs); returns a factory."""

    def make(method: str = "gradcam", extra: str = "") -> Path:
        p = tmp_path / f"tiny_{method.replace(',', '_')}.yaml"
        p.write_text(TINY_CONFIG.format(method=method) + extra)
        return p

    return make
