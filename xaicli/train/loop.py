"""The training loop of `xai train`: a backbone with a localization head (xaicli/heads.py)
fine-tuned on an ImageFolder data set.

One epoch: the backbone frozen (with its batch norm statistics) while ``epoch < freeze_epochs``;
the batches of the epoch's seeded order; per step the learning rate of a cosine decay from
``lr`` to 0 over all steps of all epochs; the loss (cross-entropy; an ACoL model sums both
branches'); then the validation accuracy. After each epoch RUN/last.pth holds the whole state and,
at a new best validation accuracy, RUN/model.pth the weights (RUN/config.yaml points at it).

Exact resumption: the global random state is reseeded from (seed, epoch) at the start of every
epoch and saved with a checkpoint taken mid-epoch (Ctrl-C), the data order and augmentation
depend only on (seed, epoch, image) (data.py), and the optimizer, the loss scaler and the
partial sums of the epoch are saved; so `--resume` after a kill (from the last epoch) or after
Ctrl-C (from the batch it stopped at) gives the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..config import Config, HeadConfig, TrainConfig
from ..engine import autocast_factory, select_device
from ..heads import with_head
from ..methods.batch import stable_seed
from ..models import build_model
from ..records import versions
from . import files
from .data import Augment, Split, TrainImages, epoch_batches, find_split, loader

UPDATE_S = 0.5  # how often the progress display reads the running loss and accuracy (one sync)


class TrainProgress(Protocol):
    def note(self, text: str) -> None: ...
    def start(self, total: int, description: str) -> None: ...
    def update(self, done: int, loss: float, acc: float, images_per_s: float) -> None: ...
    def finish(self) -> None: ...
    def epoch(self, record: dict[str, Any], best: bool) -> None: ...


class _NoProgress:
    def note(self, text: str) -> None:
        pass

    def start(self, total: int, description: str) -> None:
        pass

    def update(self, done: int, loss: float, acc: float, images_per_s: float) -> None:
        pass

    def finish(self) -> None:
        pass

    def epoch(self, record: dict[str, Any], best: bool) -> None:
        pass


@dataclass
class TrainResult:
    out: Path
    status: str  # complete | interrupted
    epochs_done: int
    best_epoch: int | None
    best_val_acc: float | None
    report: dict[str, Any]


@dataclass
class _Running:
    """The sums of the epoch in progress up to its last finished batch."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "correct": self.correct, "seen": self.seen, "seconds": self.seconds}


@dataclass
class _State:
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of it done
    running: _Running = field(default_factory=_Running)
    best_epoch: int | None = None  # 1-based
    best_val_acc: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable images: rel -> reason


def run_train(cfg: Config, data: Path, out: Path, *, resume: bool = False, overwrite: bool = False,
              progress: TrainProgress | None = None, argv: list[str] | None = None) -> TrainResult:
    """Train ``cfg``'s backbone with ``cfg.head`` on the images under ``data`` into ``out``.
    KeyboardInterrupt leaves a resumable checkpoint and is raised again."""
    head, tc = cfg.head or HeadConfig(), cfg.train or TrainConfig()
    select_device(cfg.runtime.device)  # a missing device is a usage error before anything is written
    split = find_split(data, tc.val_fraction, tc.seed, exclude=out)
    has_checkpoint = files.prepare_out(out, resume=resume, overwrite=overwrite)
    torch.manual_seed(tc.seed)
    loaded = build_model(cfg.model, cfg.preprocess)
    model = with_head(loaded.module, head.kind, len(split.classes), head.delta)
    trainer = Trainer(cfg, split, model, loaded.preprocess, out, progress or _NoProgress())
    trainer.report_base = {"command": argv, "data": str(data), "model": loaded.description}
    if has_checkpoint:
        trainer.restore(files.load_checkpoint(out / files.LAST))
    return trainer.run()


class Trainer:
    """The state of one training run and its steps (see the module docstring)."""

    def __init__(self, cfg: Config, split: Split, model: nn.Module, preprocess: Any, out: Path,
                 progress: TrainProgress) -> None:
        head, tc = cfg.head or HeadConfig(), cfg.train or TrainConfig()
        self.cfg, self.head, self.tc, self.split = cfg, head, tc, split
        self.preprocess, self.out, self.progress = preprocess, out, progress
        self.device = device = select_device(cfg.runtime.device)
        gpu = device.type == "cuda"
        self.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu and tc.amp else "fp32"
        self.autocast = autocast_factory(device, self.precision)
        self.memory_format = torch.channels_last if gpu else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)  # type: ignore[call-overload]
        self.optimizer = _optimizer(self.model, tc)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
        self.train_set = TrainImages(split.train, preprocess, Augment(preprocess.input_size, tc.crop_scale, tc.flip),
                                     tc.seed)
        self.val_set = TrainImages(split.val, preprocess, None, tc.seed)
        self.steps_per_epoch = len(epoch_batches(len(split.train), tc.batch_size, tc.seed, 0))
        self.fingerprint = files.fingerprint(cfg, head, tc, preprocess, split.classes, len(split.train),
                                             len(split.val))
        self.state = _State()
        self.report_base: dict[str, Any] = {}
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    # ---------------------------------------------------------------------------------------
    # The run

    def run(self) -> TrainResult:
        files.write_labels(self.out, self.split.classes)
        self.progress.note(self._plan())
        try:
            while self.state.epoch < self.tc.epochs:
                self._epoch()
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            self.progress.finish()
        report = self._report("complete")
        files.write_train_json(self.out, report)
        st = self.state
        return TrainResult(self.out, "complete", st.epoch, st.best_epoch, st.best_val_acc, report)

    def _plan(self) -> str:
        st, sp = self.state, self.split
        head = f"ACoL head (delta {self.head.delta})" if self.head.kind == "acol" else "CAM head"
        text = (f"{self.report_base.get('model', 'model')} + {head}: {len(sp.classes)} classes, "
                f"{len(sp.train)} training and {len(sp.val)} validation images ({sp.source}); "
                f"{self.tc.epochs} epochs on {self.device.type} ({self.precision})")
        if st.epoch or st.step:
            text += f"; resuming at epoch {st.epoch + 1}" + (f", batch {st.step + 1}" if st.step else "")
        return text

    def _epoch(self) -> None:
        st, e = self.state, self.state.epoch
        if st.step == 0:
            torch.manual_seed(stable_seed(self.tc.seed, f"epoch:{e}"))
            st.running = _Running()
        frozen = e < self.tc.freeze_epochs
        self._set_mode(frozen)
        batches = epoch_batches(len(self.split.train), self.tc.batch_size, self.tc.seed, e)
        self.train_set.epoch = e
        total = sum(len(b) for b in batches)
        self.progress.start(total, f"epoch {e + 1}/{self.tc.epochs}" + (" (backbone frozen)" if frozen else ""))
        self._train_batches(batches)
        self.progress.finish()
        val_loss, val_acc = self._validate()
        self._end_epoch(frozen, val_loss, val_acc)

    def _train_batches(self, batches: list[list[int]]) -> None:
        st, run = self.state, self.state.running
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        base = (run.loss, run.correct, run.seen)
        seen, t0, shown = 0, time.perf_counter(), 0.0
        pin = self.device.type == "cuda"
        try:
            for batch in loader(self.train_set, batches[st.step :], self.cfg.runtime.workers, pin):
                st.skipped.update(batch.failed)
                with _atomic_step():
                    if batch.x is not None:
                        loss, right = self._step(batch.x, batch.labels)
                        loss_sum += loss.detach().double() * len(batch.labels)
                        correct += right
                        seen += len(batch.labels)
                    st.step += 1
                now = time.perf_counter()
                if now - shown >= UPDATE_S or st.step == len(batches):
                    shown = now
                    n = base[2] + seen
                    rate = seen / max(now - t0, 1e-9)
                    self.progress.update(sum(len(b) for b in batches[: st.step]), (base[0] + float(loss_sum)) / max(n, 1),
                                         (base[1] + int(correct)) / max(n, 1), rate)
        finally:  # what the steps so far add to the epoch, also when interrupted
            run.loss, run.correct, run.seen = base[0] + float(loss_sum), base[1] + int(correct), base[2] + seen
            run.seconds += time.perf_counter() - t0

    def _step(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        st = self.state
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        lr = self._lr(st.epoch * self.steps_per_epoch + st.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            out = self.model(x, labels)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((self.loss_fn(o.float(), labels) for o in outs), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, (outs[0].argmax(1) == labels).sum()

    def _lr(self, step: int) -> float:
        total = max(1, self.tc.epochs * self.steps_per_epoch)
        return self.tc.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def _set_mode(self, frozen: bool) -> None:
        """Training mode; a frozen backbone also keeps its batch norm statistics (eval mode)."""
        self.model.train()
        backbone = self.model.backbone
        for p in backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            backbone.eval()

    def _validate(self) -> tuple[float, float]:
        self.model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        batches = [list(range(i, min(i + self.tc.batch_size, len(self.val_set))))
                   for i in range(0, len(self.val_set), self.tc.batch_size)]
        with torch.inference_mode():
            for batch in loader(self.val_set, batches, self.cfg.runtime.workers, self.device.type == "cuda"):
                self.state.skipped.update(batch.failed)
                if batch.x is None:
                    continue
                x = batch.x.to(self.device).contiguous(memory_format=self.memory_format)
                labels = batch.labels.to(self.device)
                with self.autocast():
                    logits = self.model(x).float()
                loss_sum += float(self.loss_fn(logits, labels)) * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                n += len(labels)
        return loss_sum / max(n, 1), correct / max(n, 1)

    def _end_epoch(self, frozen: bool, val_loss: float, val_acc: float) -> None:
        st, run = self.state, self.state.running
        record = {
            "epoch": st.epoch + 1, "lr": self._lr((st.epoch + 1) * self.steps_per_epoch - 1), "frozen": frozen,
            "train_loss": run.loss / max(run.seen, 1), "train_acc": run.correct / max(run.seen, 1),
            "val_loss": val_loss, "val_acc": val_acc, "images": run.seen,
            "images_per_s": run.seen / run.seconds if run.seconds > 0 else None, "train_s": round(run.seconds, 3),
        }
        st.history.append(record)
        best = st.best_val_acc is None or val_acc > st.best_val_acc
        st.epoch, st.step, st.running = st.epoch + 1, 0, _Running()
        if best:
            st.best_epoch, st.best_val_acc = st.epoch, val_acc
            self._save_model()
        files.save_torch(self.out / files.LAST, self._checkpoint())
        files.write_train_json(self.out, self._report("running"))
        self.progress.epoch(record, best)

    # ---------------------------------------------------------------------------------------
    # Files

    def _save_model(self) -> None:
        files.save_torch(self.out / files.MODEL, files.cpu_state(self.model))
        cfg = files.explain_config(self.cfg, self.head, self.preprocess, self.split.classes, self.out)
        st = self.state
        header = (f"# Written by `xai train` ({self.head.kind} head, {len(self.split.classes)} classes): the weights "
                  f"of epoch {st.best_epoch}, validation accuracy {st.best_val_acc:.4f}.\n"
                  f"# Explain with: xai explain IMAGES --config {self.out / files.CONFIG}\n"
                  if st.best_epoch is not None else "# Written by `xai train` (interrupted before an epoch ended).\n")
        files.write_config(self.out, cfg, header)

    def _checkpoint(self) -> dict[str, Any]:
        st = self.state
        return {
            "format": files.FORMAT, "version": 1, "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "epoch": st.epoch, "step": st.step, "epochs": self.tc.epochs,
            "model": files.cpu_state(self.model), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "running": st.running.state(), "best_epoch": st.best_epoch, "best_val_acc": st.best_val_acc,
            "history": st.history, "skipped": st.skipped,
        }

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from RUN/last.pth (after checking it was made with the same settings and data)."""
        files.check_resumable(ck, self.fingerprint, self.out / files.LAST)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        if ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        st = self.state
        st.epoch, st.step = int(ck["epoch"]), int(ck["step"])
        st.running = _Running(**ck["running"])
        st.best_epoch, st.best_val_acc = ck["best_epoch"], ck["best_val_acc"]
        st.history, st.skipped = list(ck["history"]), dict(ck["skipped"])
        if st.step:  # stopped mid-epoch: continue its random stream where it was
            torch.set_rng_state(ck["rng_cpu"])
            if ck["rng_cuda"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(ck["rng_cuda"])

    def _save_interrupted(self) -> None:
        """Ctrl-C: the state at the last finished batch, resumable; model.pth and config.yaml
        hold the current weights when no epoch has ended yet."""
        files.save_torch(self.out / files.LAST, self._checkpoint())
        if not (self.out / files.MODEL).exists():
            self._save_model()
        files.write_train_json(self.out, self._report("interrupted"))

    def _report(self, status: str) -> dict[str, Any]:
        st, sp = self.state, self.split
        return {
            "format": files.FORMAT, "version": 1, "status": status, "started": self.started,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **self.report_base,
            "classes": sp.classes,
            "split": {"source": sp.source, "train_images": len(sp.train), "val_images": len(sp.val),
                      "skipped": dict(sorted(st.skipped.items()))},
            "head": {"kind": self.head.kind, **({"delta": self.head.delta} if self.head.kind == "acol" else {})},
            "train": {**self.tc.__dict__, "crop_scale": list(self.tc.crop_scale)},
            "preprocess": files.describe_preprocess(self.preprocess),
            "device": self.device.type, "precision": self.precision,
            "epochs_done": len(st.history), "best": {"epoch": st.best_epoch, "val_acc": st.best_val_acc},
            "epochs": st.history,
            "files": {"model": files.MODEL, "config": files.CONFIG, "labels": files.LABELS, "checkpoint": files.LAST},
            "versions": versions(),
        }


HELD_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def _atomic_step() -> Iterator[None]:
    """Ctrl-C (or SIGTERM, SIGHUP) during an optimizer step is held until the step and its
    bookkeeping are done, then delivered to the handler in place before the step (Ctrl-C:
    KeyboardInterrupt; `xai train`: an interruption too): a checkpoint never holds half an update
    or a batch counted wrong."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])
        raise KeyboardInterrupt  # a handler that returned (SIG_IGN): stop as on Ctrl-C all the same


def _optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on weight matrices and kernels, not on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.momentum > 0)
    return torch.optim.AdamW(groups, lr=tc.lr)
