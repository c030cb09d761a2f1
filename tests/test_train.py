"""`xai train` end to end on the CPU: a small backbone on a small synthetic set (xai synth) learns
well above chance, its CAM boxes find the objects far better than a centred box of the same
size, an ACoL model is explained with both branches fused, and a run killed or interrupted and
resumed gives the weights of the uninterrupted run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xaicli.config import apply_overrides, load_config
from xaicli.errors import OutputError
from xaicli.metrics.localization import box_iou
from xaicli.records import read_run
from xaicli.run import run_explain
from xaicli.synth import SynthSpec, generate
from xaicli.train import run_train

CLASSES = ("disc", "stripes", "triangle")
CONFIG = """
model: {source: factory, factory: "tests.nets:small_cnn", kwargs: {width: 32}}
preprocess: {resize: [48, 48], mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
head: cam
train: {epochs: 10, batch_size: 16, lr: 0.01}
runtime: {device: cpu, workers: 0, batch_size: 32}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthSpec(classes=CLASSES, per_class=60, val_per_class=20, size=48, min_scale=0.25, max_scale=0.45))
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "small.yaml"
    p.write_text(CONFIG)
    return p


@pytest.fixture(scope="module")
def cam_run(data: Path, config: Path, tmp_path_factory: pytest.TempPathFactory):
    return run_train(load_config(config), data, tmp_path_factory.mktemp("cam_run"))


@pytest.fixture(scope="module")
def acol_run(data: Path, config: Path, tmp_path_factory: pytest.TempPathFactory):
    return run_train(apply_overrides(load_config(config), head="acol"), data, tmp_path_factory.mktemp("acol_run"))


GRID = [round(0.05 * i, 2) for i in range(20)]  # the box thresholds: the box_iou curve's grid


def explain_val(run: Path, data: Path, out: Path, methods: str) -> list[dict]:
    cfg = apply_overrides(load_config(run / "config.yaml"), method=methods,
                          ground_truth=str(data / "ground_truth" / "val" / "boxes.csv"))
    cfg = dataclasses.replace(cfg, metrics={"boxes": {"thresholds": GRID}, "box_iou": {"curve_interval": 0.05}})
    res = run_explain(cfg, data / "val", out)
    assert res.exit_code == 0
    return read_run(out).records


def true_boxes(data: Path) -> dict[str, np.ndarray]:
    with open(data / "ground_truth" / "val" / "boxes.csv") as f:
        return {r["path"]: np.array([float(r[k]) for k in ("x0", "y0", "x1", "y1")]) for r in csv.DictReader(f)}


def centred(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """A box of the same width and height as ``box``, centred in the image (inclusive corners)."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    x0, y0 = (width - w) / 2, (height - h) / 2
    return np.array([x0, y0, x0 + w - 1, y0 + h - 1])


def box_ious(records: list[dict], method: str, truth: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per image, at the box threshold that fits the data best (as MaxBoxAcc chooses it): the IoU of
    the method's box with the true box, and that of a centred box of the same size."""
    entries = [next(e for e in r["explanations"] if e["method"] == method) for r in records]
    curves = np.array([e["metrics"]["box_iou_curve"] for e in entries])
    best = int(np.argmax(curves.mean(0)))
    boxes = [np.array(e["metrics"]["boxes"][best]) for e in entries]
    base = [float(box_iou(centred(b, r["width"], r["height"]), truth[r["path"]])) for b, r in zip(boxes, records, strict=True)]
    return curves[:, best], np.array(base)


# --- learning and localization --------------------------------------------------------------------


def test_training_learns_well_above_chance_and_writes_a_ready_run(cam_run, data):
    out = cam_run.out
    assert cam_run.status == "complete" and cam_run.epochs_done == 10
    assert cam_run.best_val_acc >= 0.55  # chance: 1/3
    report = json.loads((out / "train.json").read_text())
    assert report["status"] == "complete" and report["classes"] == list(CLASSES)
    assert report["split"] == {"source": "val/ folder", "train_images": 180, "val_images": 60, "skipped": {}}
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, 11))
    assert report["epochs"][-1]["train_loss"] < report["epochs"][0]["train_loss"]
    assert max(e["val_acc"] for e in report["epochs"]) == cam_run.best_val_acc
    assert report["epochs"][0]["lr"] > report["epochs"][-1]["lr"]  # cosine decay
    state = torch.load(out / "model.pth", weights_only=True)
    assert state["head.fc.weight"].shape == (3, 32)
    cfg = load_config(out / "config.yaml")  # as `xai explain --config` reads it
    assert cfg.model.checkpoint == str((out / "model.pth").resolve())
    assert (out / "labels.txt").read_text().split() == list(CLASSES)
    assert cfg.target_layer == "backbone" and cfg.method == ("cam",)
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["epoch"] == 10 and last["step"] == 0


def test_cam_boxes_find_the_objects_far_better_than_a_centred_box(cam_run, data, tmp_path):
    records = explain_val(cam_run.out, data, tmp_path / "explain", "cam,gradcam")
    assert len(records) == 60 and all(r["status"] == "ok" for r in records)
    assert {r["topk"][0]["label"] for r in records} <= set(CLASSES)  # labels come with the config
    ours, base = box_ious(records, "cam", true_boxes(data))
    assert ours.mean() > 2 * base.mean() and ours.mean() > base.mean() + 0.15, (ours.mean(), base.mean())
    agg = read_run(tmp_path / "explain").run["aggregates"]
    assert agg["cam"]["max_box_acc"]["value"] == agg["gradcam"]["max_box_acc"]["value"]  # Grad-CAM = CAM / Z


def test_acol_model_is_explained_with_both_branches_fused(acol_run, data, tmp_path):
    assert acol_run.best_val_acc >= 0.55  # chance: 1/3
    state = torch.load(acol_run.out / "model.pth", weights_only=True)
    assert {"head.a.fc.weight", "head.b.fc.weight"} <= set(state)
    records = explain_val(acol_run.out, data, tmp_path / "explain", "cam,gradcam,eigencam")
    ours, base = box_ious(records, "cam", true_boxes(data))
    assert ours.mean() > base.mean() + 0.1, (ours.mean(), base.mean())
    agg = read_run(tmp_path / "explain").run["aggregates"]
    for method in ("cam", "gradcam", "eigencam"):
        assert 0 <= agg[method]["max_box_acc"]["value"] <= 1 and agg[method]["box_iou"]["n"] == 60
    # Fused maps are normalised per branch, so CAM and Grad-CAM (= CAM / Z per branch) agree exactly.
    assert agg["cam"]["box_iou"]["mean"] == pytest.approx(agg["gradcam"]["box_iou"]["mean"])
    cam_max = [next(e for e in r["explanations"] if e["method"] == "cam")["map"]["max"] for r in records]
    assert cam_max == pytest.approx([1.0] * 60)


# --- exact resumption --------------------------------------------------------------------------------


class Stopper:
    """A progress hook that raises ``error`` when epoch ``epoch`` (1-based) has done ``step``
    batches (the loop reports after every batch: UPDATE_S is patched to 0)."""

    def __init__(self, epoch: int, step: int, error: BaseException) -> None:
        self.at, self.error, self.epochs, self.steps = (epoch, step), error, 0, 0

    def start(self, total: int, description: str) -> None:
        self.epochs, self.steps = self.epochs + 1, 0

    def update(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        self.steps += 1
        if (self.epochs, self.steps) == self.at:
            raise self.error

    def finish(self) -> None:
        pass

    def epoch(self, record: dict, best: bool) -> None:
        pass


def short_config(config: Path):
    cfg = load_config(config)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, freeze_epochs=1))


@pytest.fixture(scope="module")
def uninterrupted(data: Path, config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("whole")
    run_train(short_config(config), data, out)
    return torch.load(out / "last.pth", weights_only=True)


class Kill(Exception):
    """Stands for SIGKILL: nothing of the epoch in progress is saved."""


@pytest.mark.parametrize(("error", "saved_at"), [(Kill(), (1, 0)), (KeyboardInterrupt(), (1, 5))],
                         ids=["kill", "ctrl-c"])
def test_resume_reproduces_the_uninterrupted_weights(data, config, tmp_path, uninterrupted, error, saved_at,
                                                     monkeypatch):
    monkeypatch.setattr("xaicli.train.loop.UPDATE_S", 0.0)
    cfg = short_config(config)
    with pytest.raises(type(error)):
        run_train(cfg, data, tmp_path, progress=Stopper(epoch=2, step=5, error=error))
    ck = torch.load(tmp_path / "last.pth", weights_only=True)
    assert (ck["epoch"], ck["step"]) == saved_at  # the last epoch's end, or the batch Ctrl-C stopped at
    assert (tmp_path / "model.pth").exists() and (tmp_path / "config.yaml").exists()
    with pytest.raises(OutputError, match="already holds a training run"):
        run_train(cfg, data, tmp_path)
    res = run_train(cfg, data, tmp_path, resume=True)
    assert res.status == "complete" and res.epochs_done == 3
    final = torch.load(tmp_path / "last.pth", weights_only=True)
    for k, v in uninterrupted["model"].items():
        assert torch.equal(final["model"][k], v), k
    timeless = [{k: v for k, v in h.items() if k not in ("images_per_s", "train_s")} for h in final["history"]]
    assert timeless == [{k: v for k, v in h.items() if k not in ("images_per_s", "train_s")}
                        for h in uninterrupted["history"]]


def test_resume_with_other_settings_is_refused(data, config, tmp_path):
    cfg = short_config(config)
    cfg1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1))
    run_train(cfg1, data, tmp_path)
    other = dataclasses.replace(cfg1, train=dataclasses.replace(cfg1.train, lr=0.1))
    with pytest.raises(OutputError, match="other train"):
        run_train(other, data, tmp_path, resume=True)


def test_frozen_backbone_keeps_its_weights_and_statistics(data, config, tmp_path):
    from xaicli.heads import with_head
    from xaicli.models import build_model

    cfg = short_config(config)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, freeze_epochs=1))
    run_train(cfg, data, tmp_path)
    torch.manual_seed(cfg.train.seed)  # the run's initial weights
    start = with_head(build_model(cfg.model, cfg.preprocess).module, "cam", 3).state_dict()
    trained = torch.load(tmp_path / "model.pth", weights_only=True)
    backbone = [k for k in start if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    for k in backbone:  # weights and batch norm statistics
        assert torch.equal(trained[k], start[k]), k
    assert not torch.equal(trained["head.fc.weight"], start["head.fc.weight"])
