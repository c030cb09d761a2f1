"""Resize, crop and normalise one decoded image, and the window of the original image that the
model input covers (so maps can be put back at each image's own size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import PreprocessConfig
from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    resize: int | tuple[int, int]  # int: shorter side (needs a crop); (h, w): exact size
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @staticmethod
    def resolve(cfg: PreprocessConfig, from_model: dict[str, Any]) -> Preprocess:
        """Config values win; the model's own (torchvision weights / timm) fill the gaps;
        ImageNet's 256 -> 224 recipe is the last resort."""

        def pick(key: str, fallback: Any) -> Any:
            v = getattr(cfg, key)
            if v is not None:
                return v
            v = from_model.get(key)
            return fallback if v is None else v

        resize = pick("resize", 256)
        crop = pick("crop", 224 if cfg.resize is None and "crop" not in from_model else None)
        if isinstance(crop, int):
            crop = (crop, crop)
        if isinstance(resize, (list, tuple)):
            resize = (int(resize[0]), int(resize[1]))
        if isinstance(resize, int) and crop is None:
            raise ConfigError(
                f"preprocess.resize: {resize} resizes the shorter side, so images of different shapes would give "
                "inputs of different sizes that cannot be batched",
                "add preprocess.crop (e.g. 224) or give resize as [height, width]",
            )
        interp = str(pick("interpolation", "bilinear")).lower()
        if interp not in ("bilinear", "bicubic", "nearest"):
            interp = "bilinear"
        return Preprocess(
            resize=resize,
            crop=tuple(crop) if crop is not None else None,  # type: ignore[arg-type]
            mean=tuple(pick("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(pick("std", IMAGENET_STD)),  # type: ignore[arg-type]
            interpolation=interp,
        )

    @property
    def input_size(self) -> tuple[int, int]:
        if self.crop is not None:
            return self.crop
        assert not isinstance(self.resize, int)
        return self.resize

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.resize, int):  # torchvision's rule for a single size
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.resize * long / short)
            return (self.resize, new_long) if height <= width else (new_long, self.resize)
        return self.resize

    def window(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, height, width) of the original image that the model input shows."""
        rh, rw = self.resized_size(height, width)
        sy, sx = height / rh, width / rw
        if self.crop is None:
            return 0.0, 0.0, float(height), float(width)
        ch, cw = self.crop
        top, left = round((rh - ch) / 2.0), round((rw - cw) / 2.0)
        return top * sy, left * sx, ch * sy, cw * sx

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 (3, H, W) -> float32 (3, h, w), normalised."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation)
        h, w = self.resized_size(image.shape[1], image.shape[2])
        x = F.resize(image, [h, w], interpolation=mode, antialias=True)
        if self.crop is not None:
            x = F.center_crop(x, list(self.crop))
        x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return (x - mean) / std
