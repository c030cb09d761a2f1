"""`xai synth`: seeded and deterministic, the layout `xai train` and `--ground-truth` read, and
boxes that are the masks' bounding boxes."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xaicli.cli import app
from xaicli.errors import ConfigError, OutputError
from xaicli.metrics.ground_truth import GroundTruth, mask_boxes, read_mask
from xaicli.synth import CATALOGUE, SynthSpec, generate, inside

pytest.importorskip("skimage")
SMALL = SynthSpec(classes=3, per_class=3, val_per_class=2, size=40, seed=5)


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_arguments_give_the_same_files_and_another_seed_others(tmp_path):
    generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SMALL)
    generate(tmp_path / "c", SynthSpec(classes=3, per_class=3, val_per_class=2, size=40, seed=6))
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a["train/disc/disc_0000.jpg"] != c["train/disc/disc_0000.jpg"]
    # An image does not depend on what else is generated: more images per class keep the first ones.
    generate(tmp_path / "d", SynthSpec(classes=3, per_class=4, val_per_class=2, size=40, seed=5))
    d = digest(tmp_path / "d")
    assert d["train/stripes/stripes_0002.jpg"] == a["train/stripes/stripes_0002.jpg"]


def test_layout_and_ground_truth(tmp_path):
    res = generate(tmp_path, SMALL)
    assert res.counts == {"train": 9, "val": 6}
    names = CATALOGUE[:3]
    for split, n in (("train", 3), ("val", 2)):
        for name in names:
            assert len(list((tmp_path / split / name).glob("*.jpg"))) == n
        with open(tmp_path / "ground_truth" / split / "boxes.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 3 * n
        for r in rows:
            image = Image.open(tmp_path / split / r["path"])
            assert image.size == (40, 40) and image.mode == "RGB"
            mask = read_mask(tmp_path / "ground_truth" / split / "masks" / r["path"].replace(".jpg", ".png"), 40, 40)
            assert 0.02 < mask.mean() < 0.5
            ys, xs = np.nonzero(mask)
            assert [int(r[k]) for k in ("x0", "y0", "x1", "y1")] == [xs.min(), ys.min(), xs.max(), ys.max()]
            assert r["label"] == r["path"].split("/")[0]
            assert len(mask_boxes(mask)) >= 1
    # What `xai explain DIR/val --ground-truth ...` reads, keyed by the path under val/.
    by_masks = GroundTruth.from_masks(tmp_path / "ground_truth" / "val" / "masks")
    by_boxes = GroundTruth.from_boxes(tmp_path / "ground_truth" / "val" / "boxes.csv")
    assert set(by_masks.masks) == {f"{n}/{n}_{i:04d}" for n in names for i in range(2)}
    assert "disc/disc_0001.jpg" in by_boxes.boxes


def test_shapes_are_what_their_names_say():
    t = np.linspace(-1.2, 1.2, 241)
    v, u = np.meshgrid(t, t, indexing="ij")
    area = {name: inside(name, u, v).mean() * 2.4**2 for name in CATALOGUE}
    assert area["disc"] == pytest.approx(np.pi, rel=0.02)
    assert area["square"] == pytest.approx(1.44**2, rel=0.03)
    assert area["triangle"] == pytest.approx(3 * np.sqrt(3) / 4, rel=0.03)  # inscribed in the unit circle
    assert area["stripes"] == pytest.approx(np.pi * 0.7, rel=0.02)  # the textured classes: an ellipse
    assert area["star"] < area["disc"] and area["cross"] < area["square"] * 1.2


def test_bad_arguments_and_an_existing_set(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'disc'"):
        generate(tmp_path, SynthSpec(classes=("disk", "star")))
    with pytest.raises(ConfigError, match="between 2 and 8"):
        generate(tmp_path, SynthSpec(classes=9))
    generate(tmp_path, SynthSpec(classes=2, per_class=1, val_per_class=1, size=32))
    with pytest.raises(OutputError, match="already holds a data set"):
        generate(tmp_path, SynthSpec(classes=2, per_class=1, val_per_class=1, size=32))
    generate(tmp_path, SynthSpec(classes=("star", "dots"), per_class=1, val_per_class=0, size=32), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["dots", "star"]
    assert not (tmp_path / "val").exists()


def test_cli(tmp_path):
    r = CliRunner().invoke(app, ["synth", str(tmp_path), "--classes", "disc,cross", "--per-class", "2",
                                 "--val-per-class", "1", "--size", "32", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "4 training and 2 validation images of 2 classes" in r.output
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["cross", "disc"]
    r = CliRunner().invoke(app, ["synth", str(tmp_path)])
    assert r.exit_code == 2 and "--overwrite" in r.output
