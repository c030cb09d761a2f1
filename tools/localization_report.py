"""The localization table of docs/training.md: trained runs (`xai train --out RUN`) explained on a
synthetic validation set (`xai synth DIR`), against centred-box baselines.

    python tools/localization_report.py --data DIR RUN [RUN ...] [--methods cam,gradcam]
                                        [--picture docs/training_maps.jpg] [--json out.json]

For each RUN: `xai explain DIR/val --config RUN/config.yaml` into RUN/val-explain with the boxes at
every threshold of the box_iou grid (0, 0.05, ..., 0.95); then per method: top-1 accuracy, the box
IoU at the box_iou default threshold (0.2), MaxBoxAcc (delta 0.5) and MaxBoxAccV2 with their
threshold, the mean IoU at the threshold that fits best, and the same for a centred box of the
same size as the method's box there; the pointing game (the map's peak within 15 px of the true
box) and the energy inside the box. Baselines that know nothing of the image: a centred box of
the true box's size, the one centred box size that fits the whole set best (MaxBoxAcc's rule),
and the image centre as the pointing game's point.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

GRID = [round(0.05 * i, 2) for i in range(20)]


def explain(run: Path, data: Path, methods: str) -> Path:
    from xaicli.config import apply_overrides, load_config
    from xaicli.run import run_explain

    out = run / "val-explain"
    cfg = apply_overrides(load_config(run / "config.yaml"), method=methods,
                          ground_truth=str(data / "ground_truth" / "val" / "boxes.csv"))
    cfg = dataclasses.replace(cfg, metrics={"boxes": {"thresholds": GRID}, "box_iou": {"curve_interval": 0.05},
                                            "pointing_game": {}, "energy": {}},
                              output=dataclasses.replace(cfg.output, annotate=False))  # bare overlays: the picture's tiles
    run_explain(cfg, data / "val", out, overwrite=True)
    return out


def true_boxes(data: Path) -> dict[str, np.ndarray]:
    with open(data / "ground_truth" / "val" / "boxes.csv") as f:
        return {r["path"]: np.array([float(r[k]) for k in ("x0", "y0", "x1", "y1")]) for r in csv.DictReader(f)}


def centred(width: float, height: float, image_w: int, image_h: int) -> np.ndarray:
    x0, y0 = (image_w - width) / 2, (image_h - height) / 2
    return np.array([x0, y0, x0 + width - 1, y0 + height - 1])


def method_row(records: list[dict], aggregates: dict, method: str, truth: dict[str, np.ndarray]) -> dict:
    from xaicli.metrics.localization import box_iou

    entries = [next(e for e in r["explanations"] if e["method"] == method) for r in records]
    curves = np.array([e["metrics"]["box_iou_curve"] for e in entries])
    best = int(np.argmax(curves.mean(0)))
    base = []
    for e, r in zip(entries, records, strict=True):
        b = e["metrics"]["boxes"][best]
        base.append(float(box_iou(centred(b[2] - b[0] + 1, b[3] - b[1] + 1, r["width"], r["height"]),
                                  truth[r["path"]])))
    agg = aggregates[method]
    return {
        "accuracy": float(np.mean([r["topk"][0]["label"] == r["path"].split("/")[0] for r in records])),
        "box_iou_at_0.2": agg["box_iou"]["mean"],
        "max_box_acc": agg["max_box_acc"]["value"], "max_box_acc_threshold": agg["max_box_acc"]["threshold"],
        "max_box_acc_v2": agg["max_box_acc_v2"]["value"],
        "pointing": agg["pointing_hit"]["mean"], "energy": agg["energy"]["mean"],
        "best_threshold": GRID[best], "mean_iou_at_best": float(curves[:, best].mean()),
        "centred_same_size_mean_iou": float(np.mean(base)), "centred_same_size_acc": float(np.mean(np.array(base) >= 0.5)),
    }


def point_hit(x: float, y: float, box: np.ndarray, tolerance: float = 15.0) -> bool:
    """The pointing game's rule for one point: within ``tolerance`` px of the (box-shaped) object
    (the images are explained at their own size, so input and image pixels agree)."""
    dx = max(box[0] - x, 0.0, x - box[2])
    dy = max(box[1] - y, 0.0, y - box[3])
    return bool(np.hypot(dx, dy) <= tolerance)


def baselines(records: list[dict], truth: dict[str, np.ndarray]) -> dict:
    from xaicli.metrics.localization import box_iou

    same = [float(box_iou(centred(t[2] - t[0] + 1, t[3] - t[1] + 1, r["width"], r["height"]), t))
            for r in records for t in [truth[r["path"]]]]
    fractions = np.linspace(0.05, 1.0, 96)  # the side of a square centred box, as a fraction of the image's
    per_size = np.array([[float(box_iou(centred(f * r["width"], f * r["height"], r["width"], r["height"]),
                                        truth[r["path"]])) for r in records] for f in fractions])
    acc = (per_size >= 0.5).mean(1)
    centre = [point_hit((r["width"] - 1) / 2, (r["height"] - 1) / 2, truth[r["path"]]) for r in records]
    return {"centre_point": {"pointing": float(np.mean(centre))},
            "centred_true_size": {"mean_iou": float(np.mean(same)), "acc": float(np.mean(np.array(same) >= 0.5))},
            "centred_best_single_size": {"max_box_acc": float(acc.max()), "side": float(fractions[int(acc.argmax())]),
                                         "mean_iou": float(per_size[int(acc.argmax())].mean())}}


def picture(runs: list[Path], data: Path, rows: dict, path: Path, method: str = "cam", per_class: int = 2) -> None:
    """Per image: the image with its true box (green), then each run's map overlay with its box at
    the run's best threshold (white)."""
    import cv2
    from PIL import Image

    from xaicli.records import read_run

    truth = true_boxes(data)
    reads = [read_run(r / "val-explain") for r in runs]
    by_path = [{rec["path"]: rec for rec in rd.records} for rd in reads]
    classes = sorted({p.split("/")[0] for p in truth})
    paths = [p for c in classes for p in sorted(q for q in truth if q.startswith(c + "/"))[:per_class]]
    tiles = []
    for p in paths:
        img = np.asarray(Image.open(data / "val" / p).convert("RGB")).copy()
        x0, y0, x1, y1 = (int(v) for v in truth[p])
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 255, 0), 1)
        row = [img]
        for run, rd, recs in zip(runs, reads, by_path, strict=True):
            e = next(e for e in recs[p]["explanations"] if e["method"] == method)
            over = np.asarray(Image.open(rd.path / e["files"]["overlay"]).convert("RGB")).copy()
            b = e["metrics"]["boxes"][GRID.index(rows[run.name][method]["best_threshold"])]
            if all(np.isfinite(b)):
                cv2.rectangle(over, (int(b[0]), int(b[1])), (int(b[2]), int(b[3])), (255, 255, 255), 1)
            row.append(over)
        tiles.append(np.concatenate(row, 1))
    half = (len(tiles) + 1) // 2
    left, right = tiles[:half], tiles[half:] + [np.zeros_like(tiles[0])] * (2 * half - len(tiles))
    sheet = np.concatenate([np.concatenate(left, 0), np.full((half * tiles[0].shape[0], 8, 3), 255, np.uint8),
                            np.concatenate(right, 0)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--methods", default="cam,gradcam")
    ap.add_argument("--picture", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from xaicli.records import read_run

    truth = true_boxes(args.data)
    rows: dict = {}
    records: list[dict] = []
    for run in args.runs:
        rd = read_run(explain(run, args.data, args.methods))
        records = rd.records
        train = json.loads((run / "train.json").read_text())
        rows[run.name] = {m: method_row(rd.records, rd.run["aggregates"], m, truth) for m in args.methods.split(",")}
        rows[run.name]["train"] = {"head": train["head"], "best": train["best"], "epochs": len(train["epochs"]),
                                   "images_per_s": [e["images_per_s"] for e in train["epochs"]]}
    rows["baselines"] = baselines(records, truth)
    if args.picture:
        picture(args.runs, args.data, rows, args.picture, args.methods.split(",")[0])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
