"""Maps from a factorisation of the target layer's activations over the locations, computed for the
whole batch on the device: KPCA-CAM (the first kernel principal component) and Deep Feature
Factorization (non-negative matrix factorisation into concepts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import positive
from . import register
from .batch import Batch, MethodOutput

# --------------------------------------------------------------------------------------------
# KPCA-CAM


@dataclass(frozen=True)
class KpcaParams:
    kernel: Literal["sigmoid", "rbf", "poly", "cosine", "linear"] = "sigmoid"  # pytorch-grad-cam's default
    gamma: float | None = field(default=None, metadata={"check": positive})  # None: 1 / channels (scikit-learn)
    degree: int = field(default=3, metadata={"check": positive})  # poly only
    coef0: float = 1.0  # sigmoid and poly
    relu: bool = True


def kernel_matrix(x: Tensor, p: KpcaParams) -> Tensor:
    """(B, N, C) rows -> (B, N, N) kernel, with scikit-learn's pairwise kernel definitions."""
    gamma = p.gamma if p.gamma is not None else 1.0 / x.shape[-1]
    dot = x @ x.transpose(1, 2)
    if p.kernel == "linear":
        return dot
    if p.kernel == "sigmoid":
        return torch.tanh(gamma * dot + p.coef0)
    if p.kernel == "poly":
        return (gamma * dot + p.coef0) ** p.degree
    if p.kernel == "rbf":
        sq = dot.diagonal(dim1=1, dim2=2)
        return torch.exp(-gamma * (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0))
    norms = x.norm(dim=-1).clamp_min(1e-12)
    return dot / (norms[:, :, None] * norms[:, None, :])


def kernel_first_component(x: Tensor, p: KpcaParams) -> Tensor:
    """(B, N, C) -> (B, N): the locations' coordinates on the first kernel principal component,
    sqrt(lambda_1) v_1 of the centred kernel (scikit-learn's KernelPCA.fit_transform), its sign
    chosen so that the entry of largest magnitude is positive (scikit-learn's svd_flip)."""
    k = kernel_matrix(x.double(), p)
    k = k - k.mean(1, keepdim=True) - k.mean(2, keepdim=True) + k.mean((1, 2), keepdim=True)
    evals, evecs = torch.linalg.eigh(k)
    v = evecs[..., -1]
    proj = v * evals[..., -1].clamp_min(0).sqrt()[:, None]
    big = proj.gather(1, proj.abs().argmax(1, keepdim=True))
    return (proj * torch.where(big < 0, -1.0, 1.0)).float()


@register(
    "kpcacam",
    family="cam",
    summary="KPCA-CAM: first kernel principal component of the activations (class-agnostic)",
    paper="Karmani et al. 2024, KPCA-CAM: Visual Explainability of Deep Computer Vision Models using Kernel PCA",
    space="layer",
    params=KpcaParams,
    aliases=("kpca_cam",),
)
def kpcacam(batch: Batch, p: KpcaParams) -> Tensor:
    """Activations reshaped to (h*w, C) and centred over the locations (as pytorch-grad-cam), kernel
    PCA with one component (see ``kernel_first_component``), map = ReLU(projection), (B, h, w).
    Exact eigendecomposition of the (h*w)^2 kernel for the batch at once; same map for every class.
    The ``linear`` kernel gives Eigen-CAM (up to its sign rule)."""
    a, _ = batch.spatial(grads=False)
    b, _, h, w = a.shape
    x = a.nan_to_num().flatten(2).transpose(1, 2)
    proj = kernel_first_component(x - x.mean(1, keepdim=True), p).reshape(b, h, w)
    return proj.clamp_min(0) if p.relu else proj


# --------------------------------------------------------------------------------------------
# Deep Feature Factorization


@dataclass(frozen=True)
class DffParams:
    concepts: int = field(default=5, metadata={"check": positive})  # K, the NMF's components
    # Which concept's map is shown: 1 = the one contributing most to the target class's logit,
    # 2 = the second, ... (run again with another rank for the other concepts).
    rank: int = field(default=1, metadata={"check": positive})
    iterations: int = field(default=200, metadata={"check": positive})  # multiplicative updates


def nmf(v: Tensor, k: int, iterations: int, gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """V (B, C, N) >= 0 ~ W (B, C, K) @ H (B, K, N), both >= 0: Lee & Seung's multiplicative
    updates for the Frobenius norm, from scikit-learn's ``init='random'`` scale (sqrt(mean V / K)
    times |N(0, 1)|), drawn from each image's generator."""
    _, c, n = v.shape
    avg = (v.mean((1, 2)) / k).sqrt()[:, None, None]
    w = torch.stack([torch.randn(c, k, generator=g, device=v.device).abs() for g in gens]) * avg
    h = torch.stack([torch.randn(k, n, generator=g, device=v.device).abs() for g in gens]) * avg
    eps = 1e-10
    for _ in range(iterations):
        h = h * (w.transpose(1, 2) @ v) / (w.transpose(1, 2) @ w @ h + eps)
        w = w * (v @ h.transpose(1, 2)) / (w @ (h @ h.transpose(1, 2)) + eps)
    return w, h


@register(
    "dff",
    family="cam",
    summary="Deep Feature Factorization: NMF concepts of the activations; the map of the concept "
    "contributing most to the class",
    paper="Collins et al. 2018, Deep Feature Factorization for Concept Discovery",
    space="layer",
    grad_of="layer",
    params=DffParams,
    aliases=("deep_feature_factorization",),
)
def dff(batch: Batch, p: DffParams) -> MethodOutput:
    """Per image, the activations (C, h*w), shifted by each channel's minimum (as pytorch-grad-cam),
    are factorised V ~ W H into K concepts: W (C, K) the concepts' channel profiles, H (K, h*w)
    where each concept is. A concept's contribution to the target logit y_c is the first-order
    term of its part of the reconstruction, sum_{k',ij} G_{k'ij} W_{k'k} H_{kij} (G = dy_c/dA;
    on a GAP + linear head, exactly the head's logit of the concept's pooled part). Map: H of the
    concept of the given ``rank`` by contribution (1 = largest), (B, h, w), non-negative.

    Extras: ``concept`` (its index in the factorisation) and ``concept_contributions`` (B, K), all
    K contributions in factorisation order. Departure from pytorch-grad-cam: it factorises the
    whole batch jointly (concepts shared by the images of a batch, so a map depends on its batch
    mates) and leaves the choice of concept to the user's classifier on the concept vectors; here
    each image is factorised alone and the concept is chosen by its contribution to the class."""
    a, g = batch.spatial()
    b, c, hh, ww = a.shape
    v = a.nan_to_num().flatten(2)
    v = v - v.amin(2, keepdim=True)
    k = min(p.concepts, c, hh * ww)
    w, h = nmf(v.double(), k, p.iterations, batch.generators())
    w, h = w.float(), h.float()
    contrib = torch.einsum("bcn,bck,bkn->bk", g.flatten(2), w, h)  # (B, K)
    rank = min(p.rank, k)
    chosen = contrib.topk(rank, dim=1).indices[:, -1]  # (B,)
    heat = h.gather(1, chosen[:, None, None].expand(-1, 1, hh * ww)).view(b, hh, ww)
    return MethodOutput(heat, {"concept": chosen.float(), "concept_contributions": contrib})
