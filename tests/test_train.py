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
from typer.testing import CliRunner

from xaicli.cli import app
from xaicli.config import (
    RANDOM_WEIGHTS,
    HeadConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)
from xaicli.errors import ConfigError, InputError, OutputError
from xaicli.metrics.localization import box_iou
from xaicli.records import read_run
from xaicli.run import run_explain
from xaicli.synth import SynthSpec, generate
from xaicli.train import run_train
from xaicli.train.data import Augment, epoch_batches, find_split

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


def test_localization_report_tool_agrees_with_the_records(cam_run, data, tmp_path):
    """tools/localization_report.py (the table of docs/training.md) on a trained run: its numbers
    recomputed here from the run's own records with this file's helpers."""
    from tools import localization_report as tool

    js, pic = tmp_path / "table.json", tmp_path / "maps.jpg"
    assert tool.main([str(cam_run.out), "--data", str(data), "--methods", "cam,gradcam", "--json", str(js),
                      "--picture", str(pic)]) == 0
    rows = json.loads(js.read_text())
    records = read_run(cam_run.out / "val-explain").records
    truth = true_boxes(data)
    assert len(records) == 60 and set(rows) == {cam_run.out.name, "baselines"}
    row = rows[cam_run.out.name]
    assert row["train"]["head"]["kind"] == "cam" and row["train"]["epochs"] == 10
    acc = np.mean([r["topk"][0]["label"] == r["path"].split("/")[0] for r in records])
    for method in ("cam", "gradcam"):
        ours, base = box_ious(records, method, truth)
        assert row[method]["accuracy"] == pytest.approx(acc)
        assert row[method]["mean_iou_at_best"] == pytest.approx(ours.mean())
        assert row[method]["centred_same_size_mean_iou"] == pytest.approx(base.mean())
    same = [box_iou(centred(truth[r["path"]], r["width"], r["height"]), truth[r["path"]]) for r in records]
    assert rows["baselines"]["centred_true_size"]["mean_iou"] == pytest.approx(float(np.mean(same)))
    assert row["cam"]["mean_iou_at_best"] > rows["baselines"]["centred_true_size"]["mean_iou"]
    from PIL import Image

    with Image.open(pic) as im:
        assert im.width > 48 and im.height >= 2 * 48  # per image a row: the image and the run's overlay


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

    def note(self, text: str) -> None:
        pass

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


# --- data, config, command line -------------------------------------------------------------------


def image_classes(root: Path, classes: dict[str, int]) -> Path:
    from tests.conftest import write_images

    for i, (name, n) in enumerate(classes.items()):
        write_images(root / name, n=n, seed=i, sizes=[(40, 40)])
    return root


def test_seeded_split_is_stratified_and_reproducible(tmp_path):
    root = image_classes(tmp_path, {"a": 8, "b": 5})
    s1, s2 = find_split(root, 0.25, seed=0), find_split(root, 0.25, seed=0)
    assert s1 == s2 and s1.classes == ["a", "b"] and s1.source.startswith("seeded split")
    assert [sum(s.label == c for s in s1.val) for c in (0, 1)] == [2, 2]  # ceil(0.25 * n) per class
    rels = {s.entry.rel for s in s1.train} | {s.entry.rel for s in s1.val}
    assert len(rels) == 13 and not {s.entry.rel for s in s1.train} & {s.entry.rel for s in s1.val}
    others = [find_split(root, 0.25, seed=k).val for k in range(1, 6)]
    assert any(v != s1.val for v in others)


def test_a_val_folder_is_used_as_it_is(tmp_path):
    image_classes(tmp_path / "train", {"a": 3, "b": 3})
    image_classes(tmp_path / "val", {"b": 2})
    split = find_split(tmp_path, 0.5, seed=0)
    assert split.source == "val/ folder" and len(split.train) == 6
    assert [(s.entry.rel, s.label) for s in split.val] == [("val/b/img00.png", 1), ("val/b/img01.jpg", 1)]


@pytest.mark.parametrize(("layout", "message"), [
    ({"a": 3}, "need at least 2"),
    ({"a": 3, "b": 0}, "no images in class folder"),
    ({"a": 3, "b": 1}, "too few to split"),
])
def test_unusable_data_is_refused(tmp_path, layout, message):
    for name, n in layout.items():
        (tmp_path / name).mkdir()
        image_classes(tmp_path, {name: n}) if n else None
    with pytest.raises(InputError, match=message):
        find_split(tmp_path, 0.2, seed=0)


def test_val_classes_must_be_training_classes(tmp_path):
    image_classes(tmp_path / "train", {"a": 2, "b": 2})
    image_classes(tmp_path / "val", {"c": 1})
    with pytest.raises(InputError, match="val/ has classes that train/ lacks: c"):
        find_split(tmp_path, 0.2, seed=0)


def test_augmentation_and_order_depend_only_on_seed_epoch_and_image():
    aug = Augment((24, 24), (0.3, 1.0))
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> torch.Tensor:
        return aug(image, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    windows = {aug.window(40, 60, torch.Generator().manual_seed(s)) for s in range(50)}
    assert len(windows) > 40 and all(t >= 0 and le >= 0 and t + h <= 40 and le + w <= 60 for t, le, h, w in windows)
    assert epoch_batches(10, 4, 0, 3) == epoch_batches(10, 4, 0, 3) != epoch_batches(10, 4, 0, 4)
    assert [len(b) for b in epoch_batches(9, 4, 0, 0)] == [4, 4]  # a last batch of one is dropped


def test_head_and_train_sections():
    cfg = config_from_dict({"head": "acol", "train": {"epochs": 3, "optimizer": "sgd"}})
    assert cfg.head == HeadConfig(kind="acol") and cfg.train == TrainConfig(epochs=3, optimizer="sgd")
    assert config_from_dict({"head": {"kind": "acol", "delta": 0.8}}).head.delta == 0.8
    assert "head" not in config_from_dict({}).to_dict() and "train" not in config_from_dict({}).to_dict()
    with pytest.raises(ConfigError, match=r"head.kind: expected one of 'cam', 'acol'"):
        config_from_dict({"head": "acl"})
    with pytest.raises(ConfigError, match="head.delta: must be between 0 and 1"):
        config_from_dict({"head": {"kind": "acol", "delta": 1.5}})
    with pytest.raises(ConfigError, match="train.epoch: unknown key") as e:
        config_from_dict({"train": {"epoch": 3}})
    assert "epochs" in (e.value.hint or "")
    over = apply_overrides(config_from_dict({}), epochs=2, lr=0.5, head="acol", train_batch_size=8)
    assert (over.train.epochs, over.train.lr, over.train.batch_size, over.head.kind) == (2, 0.5, 8, "acol")


def test_explain_refuses_a_training_config(config):
    from xaicli.engine import setup

    with pytest.raises(ConfigError, match="head: is read by `xai train`"):
        setup(load_config(config))


def test_cli_trains_skips_a_bad_image_and_refuses_to_mix_runs(tmp_path, config):
    data = image_classes(tmp_path / "data", {"a": 6, "b": 6})
    (data / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(data), "--out", str(out), "--epochs", "1", "--head", "acol"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "+ ACoL head (delta 0.6): 2 classes, 9 training and 4 validation images (seeded split" in r.output
    assert "best validation accuracy" in r.output and f"--config {out}/config.yaml" in r.output
    report = json.loads((out / "train.json").read_text())
    assert report["head"] == {"kind": "acol", "delta": 0.6} and report["train"]["epochs"] == 1
    assert list(report["split"]["skipped"]) == ["a/broken.jpg"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already holds a training run" in r.output
    r = CliRunner().invoke(app, [*args, "--resume", "--quiet"])  # complete: nothing left to do
    assert r.exit_code == 0 and r.output == ""
    r = CliRunner().invoke(app, [*args, "--resume", "--epochs", "2"])  # one more epoch
    assert r.exit_code == 0 and "resuming at epoch 2" in r.output, r.output
    r = CliRunner().invoke(app, ["explain", str(data / "b"), "--config", str(out / "config.yaml"), "-o",
                                 str(tmp_path / "exp"), "-m", "gradcam,layercam", "-q"])
    assert r.exit_code == 0, r.output


def test_cli_ctrl_c_exits_130_with_a_resume_hint(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("xaicli.train.run_train", interrupted)
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 130 and "rerun with --resume" in r.output


def test_cli_sigterm_exits_143_with_a_resume_hint(tmp_path, monkeypatch):
    import signal

    from xaicli.cli import Interrupted

    def terminated(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)  # what `xai`'s SIGTERM handler raises

    monkeypatch.setattr("xaicli.train.run_train", terminated)
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 143 and "rerun with --resume" in r.output


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_shipped_training_configs_build(name):
    from xaicli.heads import with_head
    from xaicli.models import build_model

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "train" / f"{name}.yaml")
    assert cfg.head is not None and cfg.train is not None
    model_cfg = dataclasses.replace(cfg.model, weights=RANDOM_WEIGHTS)  # no hub access in tests
    loaded = build_model(model_cfg, cfg.preprocess)
    assert loaded.preprocess.input_size == (128, 128)
    model = with_head(loaded.module, cfg.head.kind, 3).eval()
    assert model(torch.zeros(1, 3, 128, 128)).shape == (1, 3)


def test_ctrl_c_during_a_step_waits_for_the_step():
    import os
    import signal

    from xaicli.train.loop import _atomic_step

    done = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _atomic_step():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the step")
    assert done == ["the step"] and signal.getsignal(signal.SIGINT) is before


def test_sigterm_during_a_step_waits_for_the_step_and_reaches_the_handler_before_it():
    import os
    import signal

    from xaicli.cli import Interrupted
    from xaicli.train.loop import _atomic_step

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)  # as `xai` installs it around a command
    done = []
    try:
        with pytest.raises(Interrupted) as e, _atomic_step():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the step")
        assert done == ["the step"] and e.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_a_real_ctrl_c_leaves_a_resumable_run(data, config, tmp_path):
    """`xai train` in a process of its own, sent SIGINT during its second epoch: exit 130, the
    state saved mid-epoch, and --resume finishes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xaicli.cli", "train", "-c", str(config), "--data", str(data), "--out", str(out),
           "--epochs", "2", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("epoch 1:"):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(60) == 130, rest
    assert "rerun with --resume" in rest
    ck = torch.load(out / "last.pth", weights_only=True)
    assert (ck["epoch"], ck["step"] > 0) == (1, True)  # saved in the middle of the second epoch
    assert json.loads((out / "train.json").read_text())["status"] == "interrupted"
    cfg = apply_overrides(load_config(config), epochs=2)
    assert run_train(cfg, data, out, resume=True).epochs_done == 2
