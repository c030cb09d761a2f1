"""Where the time of `xai explain` goes: each stage of the folder run timed on its own, in one
process, on the same images, model and config (`xaicli.engine.setup`, the same functions the run
calls). Run by hand:

    python benchmarks/profile_stages.py /tmp/xai-bench-e2e/images --device cpu --batch 16
    python benchmarks/profile_stages.py /tmp/xai-bench-e2e/images --device cuda --batch 64 -c cfg.yaml

Stages, in seconds per image (each summed over all images, serial, one thread for decode and
encode as in a loader worker / writer thread, torch's threads for the model):

* decode: file -> uint8 RGB tensor (PIL, EXIF, mode conversion) - in the run: loader workers;
* preprocess: resize / crop / normalise to the model input - in the run: loader workers;
* to device: the batch and the full-size images to the device (zero on the CPU);
* explain: the shared forward (+ backward) and the method(s) (Explainer) on each batch;
* render: maps normalised, placed at each image's size, colormapped and blended, back on the host;
* encode: overlay -> JPEG/PNG bytes (OpenCV) - in the run: writer threads;
* write: bytes to a file (atomic rename) - in the run: writer threads.

In the run, decode + preprocess overlap the device work (--workers processes) and encode + write
overlap it too (a thread pool), so the run's time per image is about the largest of
(decode + preprocess) / workers, explain + render (+ to device), (encode + write) / threads,
when the cores are free to run them side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `xai` does (cli.main)

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xaicli.config import apply_overrides, load_config  # noqa: E402
from xaicli.data import decode_image, list_images  # noqa: E402
from xaicli.engine import setup  # noqa: E402
from xaicli.outputs import atomic_write, encode_image  # noqa: E402
from xaicli.render import colormap, normalize, overlay, place  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", type=Path)
    ap.add_argument("-c", "--config", type=Path, default=None, help="xai config (default: the embedded model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--method", default="gradcam")
    ap.add_argument("--format", default="jpg", choices=["jpg", "png"])
    ap.add_argument("--limit", type=int, default=None, help="use the first N images only")
    a = ap.parse_args()

    cfg = apply_overrides(load_config(a.config), method=a.method, device=a.device, batch_size=a.batch, fmt=a.format)
    t0 = time.perf_counter()
    st = setup(cfg)
    print(f"setup (model load, layer, dry run): {time.perf_counter() - t0:.2f} s")
    device = st.device
    pre = st.loaded.preprocess
    o = cfg.output
    entries = list_images(a.images).entries[: a.limit]
    n = len(entries)
    explainer = st.explainer()
    lut, dlut = colormap(o.colormap, device), colormap(o.diverging_colormap, device)
    times = dict.fromkeys(("decode", "preprocess", "to device", "explain", "render", "encode", "write"), 0.0)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        # One warm-up batch, untimed (allocator, kernels, LUT and blend table).
        warm = [pre(decode_image(e.path)) for e in entries[: min(a.batch, n)]]
        explainer(torch.stack(warm).to(device))
        sync(device)
        for start in range(0, n, a.batch):
            chunk = entries[start : start + a.batch]
            torch.set_num_threads(1)  # as in a loader worker / writer thread
            t = time.perf_counter()
            images = [decode_image(e.path) for e in chunk]
            times["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            x = torch.stack([pre(im) for im in images])
            times["preprocess"] += time.perf_counter() - t
            torch.set_num_threads(threads)
            t = time.perf_counter()
            xd = x.to(device)
            imgs = [im.to(device) for im in images]
            sync(device)
            times["to device"] += time.perf_counter() - t
            t = time.perf_counter()
            res = explainer(xd)
            sync(device)
            times["explain"] += time.perf_counter() - t
            t = time.perf_counter()
            outs = []
            for mres in res.methods:
                mode, _ = mres.spec.display(mres.params)
                norm = normalize(mres.maps[0], mode)
                for i, img in enumerate(imgs):
                    h, w = int(img.shape[1]), int(img.shape[2])
                    placed, mask = place(norm[i], h, w, pre.window(h, w))
                    ov = overlay(img, placed, dlut if mode == "diverging" else lut, o.alpha,
                                 signed=mode == "diverging", mask=mask)
                    outs.append(ov.cpu().numpy())
            times["render"] += time.perf_counter() - t
            torch.set_num_threads(1)
            t = time.perf_counter()
            blobs = [encode_image(ov, o.format, o.jpeg_quality) for ov in outs]
            times["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            for k, blob in enumerate(blobs):
                atomic_write(Path(tmp) / f"{start + k}.{o.format}", blob)
            times["write"] += time.perf_counter() - t
            torch.set_num_threads(threads)

    total = sum(times.values())
    print(f"{n} images from {a.images}, {st.loaded.description}, method {a.method}, "
          f"device {device}, batch {a.batch}, {threads} torch threads, {o.format} overlays")
    print(f"{'stage':12}{'ms/image':>10}{'share':>8}")
    for k, v in times.items():
        print(f"{k:12}{1000 * v / n:10.2f}{100 * v / total:7.1f}%")
    print(f"{'serial sum':12}{1000 * total / n:10.2f}   ({n / total:.1f} images/s if nothing overlapped)")


if __name__ == "__main__":
    main()
