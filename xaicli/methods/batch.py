"""What a method receives (Batch) and returns (MethodOutput), plus the chunked passes the
many-forward methods share. No file, device choice or progress bar in here."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, overload

import torch
from torch import Tensor, nn

from ..errors import MethodError

if TYPE_CHECKING:
    from ..layers import LayerRef


def stable_seed(seed: int, key: str) -> int:
    """A seed from a run's seed and a name (an image's path, a block of the model): the same in
    every process, whatever the batching, sharding or resuming. Any file name will do: the bytes
    of a name that is not UTF-8 (kept by Python as lone surrogates) are hashed as they are."""
    h = hashlib.blake2b(f"{seed}:{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def is_oom(e: BaseException) -> bool:
    """True for a device out-of-memory error (CUDA's own class or the generic RuntimeError)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + size))


def split_on_oom(fn: Callable[[slice], None], n: int, size: int) -> int:
    """Call ``fn`` on consecutive slices of ``range(n)`` of at most ``size`` items. On a device
    out-of-memory error a slice of several items is halved and retried; one of a single item
    re-raises. Returns the slice size that worked last (callers keep it for their next call)."""
    start, size = 0, max(1, size)
    while start < n:
        sl = slice(start, min(n, start + size))
        try:
            fn(sl)
        except Exception as e:
            if not is_oom(e) or sl.stop - sl.start == 1:
                raise
            size = max(1, (sl.stop - sl.start) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = sl.stop
    return size


def run_chunked(fn: Callable[[slice], Tensor], n: int, budget: int) -> Tensor:
    """Apply ``fn`` to slices of ``range(n)`` of at most ``budget`` items and concatenate.

    On a device out-of-memory error the slice is halved and retried, down to one item.
    """
    outs: list[Tensor] = []
    split_on_oom(lambda sl: outs.append(fn(sl)), n, budget)
    return torch.cat(outs) if outs else torch.empty(0)


@dataclass
class Runner:
    """Passes over the model at the run's precision, chunked by the engine's batch budget."""

    model: nn.Module
    budget: int
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext
    memory_format: torch.memory_format = torch.contiguous_format
    precision: str = "fp32"
    # Told the number of inputs after each chunk that went through the model (the run's progress
    # display counts passes inside a batch with it); never told of a chunk that failed.
    on_pass: Callable[[int], None] | None = None

    def _passed(self, n: int) -> None:
        if self.on_pass is not None:
            self.on_pass(n)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def logits(self, x: Tensor) -> Tensor:
        """Logits (float32) for any number of inputs, without gradients."""

        def one(sl: slice) -> Tensor:
            with torch.inference_mode(), self.autocast():
                out = self.model(self.prepare(x[sl])).float()
            self._passed(sl.stop - sl.start)
            return out

        return run_chunked(one, x.shape[0], self.budget)

    def scores(self, x: Tensor, targets: Tensor) -> Tensor:
        """The target logit of each input (B,), without gradients; ``targets`` is (B,)."""

        def one(sl: slice) -> Tensor:
            with torch.inference_mode(), self.autocast():
                out = self.model(self.prepare(x[sl])).float()
            self._passed(sl.stop - sl.start)
            return out.gather(1, targets[sl, None]).squeeze(1)

        return run_chunked(one, x.shape[0], self.budget)

    def scores_of(
        self, build: Callable[[Tensor], Tensor], n: int, targets: Tensor, prob: bool = False
    ) -> Tensor:
        """Target scores (n,) of ``n`` inputs made on demand, without gradients: ``build(idx)``
        returns the inputs of the items ``idx`` (int64 indices on the device), one chunk of the
        budget at a time (halved on out-of-memory), so only one chunk of inputs lives at a time.
        ``targets`` is (n,); ``prob``: the target's softmax probability instead of its logit."""

        def one(sl: slice) -> Tensor:
            idx = torch.arange(sl.start, sl.stop, device=targets.device)
            with torch.inference_mode():
                xs = build(idx)
                with self.autocast():
                    out = self.model(self.prepare(xs)).float()
            self._passed(sl.stop - sl.start)
            return (out.softmax(1) if prob else out).gather(1, targets[idx, None]).squeeze(1)

        return run_chunked(one, n, self.budget)

    def input_gradients(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """d logit[target] / d input for each input, and the target logits, chunked."""
        grads: list[Tensor] = []

        def one(sl: slice) -> Tensor:
            xi = x[sl].detach().clone().requires_grad_(True)
            with torch.enable_grad(), self.autocast():
                out = self.model(self.prepare(xi)).float()
            score = out.gather(1, targets[sl, None]).squeeze(1)
            (g,) = torch.autograd.grad(score.sum(), xi)
            grads.append(g.float())
            self._passed(sl.stop - sl.start)
            return score.detach()

        # run_chunked retries a slice on OOM; drop a partial result of the failed try.
        def guarded(sl: slice) -> Tensor:
            n_before = len(grads)
            try:
                return one(sl)
            except Exception:
                del grads[n_before:]
                raise

        scores = run_chunked(guarded, x.shape[0], self.budget)
        return torch.cat(grads), scores


@dataclass(frozen=True)
class PixelSpace:
    """How the model input relates to pixel values in [0, 1]: ``x = (pixel - mean) / std`` per channel.

    Filled from the run's preprocessing; the default (mean 0, std 1) takes the input as pixels in
    [0, 1], so a black image is the zero tensor (Captum's default baseline)."""

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def to_model(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) pixel values in [0, 1] -> model input."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std


@dataclass
class Batch:
    """One batch as a method sees it. Tensors live on the run's device; maps stay there."""

    x: Tensor  # (B, 3, H, W) model input
    targets: Tensor  # (B,) class index explained for each image
    logits: Tensor  # (B, K) float32 logits of the shared forward
    runner: Runner
    layer: LayerRef | None = None
    activations: Tensor | None = None  # (B, C, h, w) float32 at the target layer
    gradients: Tensor | None = None  # d logit[target] / d activations, float32
    input_grad: Tensor | None = None  # d logit[target] / d x, float32
    seeds: Tensor | None = None  # (B,) int64, one seed per image (stable across batch sizes)
    pixels: PixelSpace = field(default_factory=PixelSpace)  # input normalisation (black image, noise range)
    # Run the methods' consistency checks that read values back to the host (a sync on a GPU).
    # The folder run does them once, in setup's dry run, and not on every batch.
    checks: bool = True

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    @overload
    def spatial(self, grads: Literal[True] = True) -> tuple[Tensor, Tensor]: ...
    @overload
    def spatial(self, grads: bool) -> tuple[Tensor, Tensor | None]: ...

    def spatial(self, grads: bool = True) -> tuple[Tensor, Tensor | None]:
        """The target layer's activations A and gradients G = d logit[target] / d A, (B, C, h, w)
        each; ``grads`` False: G is not required (None when the pass took no gradients). A
        MethodError when the pass did not capture them or the layer gives no spatial map."""
        a, g = self.activations, self.gradients
        if a is None or (grads and g is None):
            raise MethodError("this method needs the target layer's activations and gradients")
        if a.dim() != 4:
            raise MethodError(
                f"target layer {self.layer.spec if self.layer else '?'} gives shape {tuple(a.shape)}, "
                "not a spatial map (B, C, h, w)",
                "pick a convolutional layer (`xai layers` prints the shapes)",
            )
        return a, g

    def target_scores(self) -> Tensor:
        return self.logits.gather(1, self.targets[:, None]).squeeze(1)

    def generators(self) -> list[torch.Generator]:
        """One seeded generator per image, so sampled noise does not depend on the batching."""
        seeds = self.seeds.tolist() if self.seeds is not None else list(range(self.size))
        gens = []
        for s in seeds:
            g = torch.Generator(device=self.x.device)
            g.manual_seed(int(s))
            gens.append(g)
        return gens


@dataclass
class MethodOutput:
    """A map plus per-image scalars (B,) that go to scores.jsonl under the method's entry."""

    map: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
