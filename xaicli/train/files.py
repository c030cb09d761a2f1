"""What `xai train` writes into its run folder, each file atomically (temporary name, then
``os.replace``)::

    RUN/model.pth     the weights at the best validation accuracy (a plain state dict)
    RUN/config.yaml   a config `xai explain --config RUN/config.yaml` takes as it is
    RUN/labels.txt    the class names, one per line, in the model's output order
    RUN/last.pth      the whole training state after the last epoch (or where Ctrl-C stopped it)
    RUN/train.json    the curves (one record per epoch), the data, the settings, the status

Checkpoints hold tensors and plain data only: they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config, HeadConfig, TrainConfig
from ..errors import ModelError, OutputError
from ..heads import FACTORY, FEATURES_LAYER
from ..outputs import atomic_write, write_json
from ..preprocess import Preprocess

MODEL = "model.pth"
CONFIG = "config.yaml"
LABELS = "labels.txt"
LAST = "last.pth"
TRAIN_JSON = "train.json"
FORMAT = "xaicli-train"
OURS = (MODEL, CONFIG, LABELS, LAST, TRAIN_JSON)


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Create the run folder; refuse to mix with an earlier training run unless --resume (returns
    True when there is a checkpoint to continue) or --overwrite (removes the earlier files)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    earlier = [n for n in (MODEL, LAST, TRAIN_JSON) if (out / n).exists()]  # what a started run leaves
    if earlier and not (resume or overwrite):
        raise OutputError(f"--out {out} already holds a training run ({', '.join(earlier)})",
                          "add --resume to continue it, --overwrite to replace it, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    if overwrite and not resume:
        for n in OURS:
            (out / n).unlink(missing_ok=True)
    return resume and (out / LAST).exists()


def fingerprint(cfg: Config, head: HeadConfig, train: TrainConfig, pre: Preprocess, classes: list[str],
                n_train: int, n_val: int) -> dict[str, Any]:
    """What must not change between a run and its --resume (the number of epochs may)."""
    t = asdict(train)
    t.pop("epochs")
    return {"model": asdict(cfg.model), "preprocess": describe_preprocess(pre), "head": asdict(head), "train": t,
            "classes": classes, "train_images": n_train, "val_images": n_val}


def describe_preprocess(pre: Preprocess) -> dict[str, Any]:
    resize = list(pre.resize) if isinstance(pre.resize, tuple) else pre.resize
    return {"resize": resize, "crop": list(pre.crop) if pre.crop else None, "mean": list(pre.mean),
            "std": list(pre.std), "interpolation": pre.interpolation}


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """RUN/last.pth, read with weights_only=True."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot be read as a training checkpoint ({type(e).__name__}: {e})",
                         "rerun with --overwrite to start again") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ModelError(f"{path}: not a checkpoint of `xai train`", "rerun with --overwrite to start again")
    return obj


def check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run with other settings or data: the result would match neither."""
    old = json.loads(saved["fingerprint"])
    current = json.loads(json.dumps(current, sort_keys=True))  # tuples as the saved lists
    diff = [k for k in current if old.get(k) != current[k]]
    if diff:
        raise OutputError(
            f"--resume: {path} was trained with other {', '.join(diff)} than the config and data given now",
            "resume with the same config and data, or start again with --overwrite (or another --out)",
        )


def write_labels(out: Path, classes: list[str]) -> None:
    atomic_write(out / LABELS, ("\n".join(classes) + "\n").encode())


def explain_config(cfg: Config, head: HeadConfig, pre: Preprocess, classes: list[str], out: Path) -> dict[str, Any]:
    """The config of the trained model, for `xai explain`: the backbone's architecture under the
    head (factory ``xaicli.heads:localizer``), the checkpoint and labels by absolute path, the
    training preprocessing and the features as the target layer."""
    m = cfg.model
    backbone: dict[str, Any] = {"source": m.source}
    for key in ("name", "factory"):
        if getattr(m, key):
            backbone[key] = getattr(m, key)
    if m.kwargs:
        backbone["kwargs"] = dict(m.kwargs)
    kwargs: dict[str, Any] = {"backbone": backbone, "num_classes": len(classes), "head": head.kind}
    if head.kind == "acol":
        kwargs["delta"] = head.delta
    run = out.resolve()
    rt = cfg.runtime
    return {
        "model": {"source": "factory", "factory": FACTORY, "kwargs": kwargs,
                  "checkpoint": str(run / MODEL), "labels": str(run / LABELS)},
        "preprocess": describe_preprocess(pre),
        "target_layer": FEATURES_LAYER,
        "method": ["cam"],
        "runtime": {"device": rt.device, "batch_size": rt.batch_size, "workers": rt.workers,
                    "precision": rt.precision, "seed": rt.seed},
    }


def write_config(out: Path, config: dict[str, Any], header: str) -> None:
    text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    atomic_write(out / CONFIG, text.encode())


def write_train_json(out: Path, report: dict[str, Any]) -> None:
    write_json(out / TRAIN_JSON, report)
