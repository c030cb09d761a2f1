"""`xai train`: fine-tune a backbone with a CAM or ACoL head for localization (loop.py), on an
ImageFolder data set (data.py), into a run folder that `xai explain` reads as it is (files.py)."""

from .loop import TrainProgress, TrainResult, run_train

__all__ = ["TrainProgress", "TrainResult", "run_train"]
