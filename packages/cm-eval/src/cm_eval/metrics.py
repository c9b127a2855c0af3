"""Inception Score, k-NN precision/recall, and class accuracy of labelled samples."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["inception_score", "precision_recall", "knn_radii", "class_accuracy"]


def _as_tensor64(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float64)
    if t.ndim != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016), over ``splits`` equal chunks.

    ``logits`` [N, K] (the FID Inception's 1008-way ``logits``); returns (mean, std) over the
    chunks, as the TF/ADM/torch-fidelity implementations (10 splits of 50k images).
    """
    logits = _as_tensor64(logits, "logits")
    if not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be in [1, N={len(logits)}], got {splits}")
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(chunk, 0) - np.log(len(chunk))  # log of the chunk's marginal p(y)
        kl = (chunk.exp() * (chunk - log_py)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exact-enough float64 Euclidean distances (cdist's matmul path cancels badly for near points).
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance from each feature vector to its k-th nearest *other* vector in the same set."""
    x = _as_tensor64(features, "features")
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(x) - 1}], got {k}")
    out = []
    for i in range(0, len(x), batch_size):
        d = _pairwise_dist(x[i : i + batch_size], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = []
    for i in range(0, len(query), batch_size):
        d = _pairwise_dist(query[i : i + batch_size], support)
        inside.append((d <= radii[None]).any(1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds with k = 3.

    precision: the fraction of generated samples inside the real manifold (the union of balls
    around each real feature with radius its k-th nearest-neighbour distance); recall: the
    fraction of real samples inside the generated manifold.
    """
    real, fake = _as_tensor64(real_features, "real_features"), _as_tensor64(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    r_real, r_fake = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    return {
        "precision": _coverage(fake, real, r_real, batch_size),
        "recall": _coverage(real, fake, r_fake, batch_size),
    }


def class_accuracy(logits, labels) -> float:
    """Fraction of samples whose argmax class equals the label they were generated for."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be [N, K] and labels [N]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.argmax(1).cpu() == labels.cpu()).double().mean().item()
