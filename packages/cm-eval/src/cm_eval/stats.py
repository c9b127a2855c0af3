"""Feature statistics (streaming, float64), the Fréchet distance, and statistics files.

File formats read and written here:

- EDM ``fid-refs/*.npz`` and pytorch-fid ``.npz``: ``mu`` [D] and ``sigma`` [D, D] (float64),
  from 2048-d Inception pool features; ``sigma`` is the unbiased (ddof = 1) covariance.
- ADM reference batches (``VIRTUAL_imagenet64_labeled.npz`` …): ``arr_0`` uint8 images
  [N, H, W, 3] (NHWC), usually with ``mu``/``sigma`` (and spatial ``mu_s``/``sigma_s``) from the
  TF Inception, which :func:`load_stats` reads too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from cm_nets.files import atomic_save_npz

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "frechet_distance_from_features",
    "save_stats",
    "load_stats",
    "load_reference_batch",
    "save_reference_batch",
]


def _as_2d_float64(features, name="features") -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, D], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; check the images fed to the feature extractor")
    return x


class SmallSampleWarning(UserWarning):
    """Feature statistics from fewer samples than feature dimensions (a rank-deficient covariance)."""


class FeatureStats:
    """Running mean and covariance of features in float64, one batch at a time.

    Batches are merged with Chan et al.'s pairwise update (mean and centred sum of squares
    M2), which keeps the covariance accurate when the mean is large compared with the spread.
    ``cov()`` is unbiased (ddof = 1), as np.cov in pytorch-fid and EDM's ``fid.py``.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.dim = dim
        self._mean = None if dim is None else np.zeros(dim)
        self._m2 = None if dim is None else np.zeros((dim, dim))

    def update(self, features) -> FeatureStats:
        x = _as_2d_float64(features)
        if self.dim is None:
            self.dim, self._mean, self._m2 = x.shape[1], np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, but these statistics hold dimension {self.dim}")
        mean_b = x.mean(0)
        xc = x - mean_b
        self._merge(len(x), mean_b, xc.T @ xc)
        return self

    def _merge(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n = self.n + n_b
        delta = mean_b - self._mean
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.n == 0:
            return self
        if self.dim is None:
            self.dim, self._mean, self._m2 = other.dim, np.zeros(other.dim), np.zeros((other.dim,) * 2)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into dimension {self.dim}")
        self._merge(other.n, other._mean, other._m2)
        return self

    def all_reduce(self) -> FeatureStats:
        """Merge the statistics of every torch.distributed rank (in rank order) into each rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.dim is None:
            raise ValueError("all_reduce needs the feature dimension on every rank: construct FeatureStats(dim)")
        d = self.dim
        # NCCL moves CUDA tensors only; gloo and MPI take CPU tensors.
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flat = torch.from_numpy(np.concatenate([[float(self.n)], self._mean, self._m2.ravel()])).to(device)
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        merged = FeatureStats(d)
        for p in parts:
            p = p.cpu().numpy()
            if p[0] > 0:
                merged._merge(int(p[0]), p[1 : 1 + d], p[1 + d :].reshape(d, d))
        self.n, self._mean, self._m2 = merged.n, merged._mean, merged._m2
        return self

    def mean(self) -> np.ndarray:
        if self.n == 0:
            raise ValueError("no features accumulated yet")
        return self._mean.copy()

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        if self.n <= self.dim:
            warnings.warn(
                f"covariance of {self.n} samples of {self.dim}-d features has rank <= {self.n - 1} < {self.dim}: "
                f"a Fréchet distance from it is biased upward; use at least {self.dim + 1} samples (FID's "
                "convention is 50,000) and compare only scores from equal sample counts",
                SmallSampleWarning,
                stacklevel=2,
            )
        return self._m2 / (self.n - 1)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"mu": self.mean(), "sigma": self.cov()}

    def save(self, path) -> Path:
        return save_stats(path, self.mean(), self.cov())


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_moments(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}; "
            "both sets of statistics must come from the same feature extractor"
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "eigh") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d² = ‖mu1 − mu2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^½).

    ``method="eigh"`` (default) uses tr((Σ1Σ2)^½) = Σ √λ_i(Σ1^½ Σ2 Σ1^½): a symmetric PSD
    matrix similar to Σ1Σ2, so eigenvalues are real, tiny negative round-off is clipped to 0,
    and singular (rank-deficient) covariances need no ε offset. ``method="sqrtm"`` is
    pytorch-fid's recipe (scipy.linalg.sqrtm of Σ1Σ2, ε = 1e-6 offset if it is not finite,
    imaginary parts dropped), for matching published numbers exactly. Float64 throughout.
    """
    mu1, sigma1, mu2, sigma2 = _check_moments(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    if method == "eigh":
        s1_half = _sqrtm_psd(sigma1)
        m = s1_half @ sigma2 @ s1_half
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(mu1)) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(
                    f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g}); "
                    "use method='eigh', which is exact for PSD covariances"
                )
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    trace_sum = np.trace(sigma1) + np.trace(sigma2)
    fd = float(diff @ diff + trace_sum - 2.0 * tr_covmean)
    # Identical inputs can round to a tiny negative number: clip that to 0, but let a clearly
    # negative value through (it would mean an invalid, non-PSD covariance).
    return max(fd, 0.0) if fd > -1e-8 * (trace_sum + 1.0) else fd


def frechet_distance_from_features(features1, features2, **kw) -> float:
    s1 = FeatureStats().update(features1)
    s2 = FeatureStats().update(features2)
    return frechet_distance(s1.mean(), s1.cov(), s2.mean(), s2.cov(), **kw)


def save_stats(path, mu, sigma, **extra) -> Path:
    """Write ``mu``/``sigma`` (float64) as an .npz that EDM's fid.py and pytorch-fid read."""
    mu, sigma, _, _ = _check_moments(mu, sigma, mu, sigma)
    return atomic_save_npz(path, mu=mu, sigma=sigma, **extra)


def load_stats(path) -> dict[str, np.ndarray]:
    """Read ``{"mu", "sigma"}`` from EDM fid-refs, pytorch-fid or ADM reference-batch .npz files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    with np.load(path) as f:
        keys = set(f.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = f["mu"], f["sigma"]
        elif "arr_0" in keys:
            raise ValueError(
                f"{path} holds reference images (arr_0) but no mu/sigma; compute statistics with "
                "cm_eval.load_reference_batch and a feature extractor"
            )
        else:
            raise ValueError(f"{path} has keys {sorted(keys)}; expected 'mu' and 'sigma' (EDM / pytorch-fid format)")
    mu, sigma, _, _ = _check_moments(mu, sigma, mu, sigma)
    return {"mu": mu, "sigma": sigma}


def load_reference_batch(path) -> np.ndarray:
    """The uint8 NHWC images (``arr_0``) of an ADM reference batch .npz."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path}")
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path} has keys {f.files}; an ADM reference batch stores its images as 'arr_0'")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"arr_0 must be uint8 [N, H, W, C] with C in 1, 3; got {images.dtype} {images.shape}")
    return images


def save_reference_batch(path, images: np.ndarray, **extra) -> Path:
    """Write uint8 NHWC images as ``arr_0`` (ADM's evaluator layout), atomically."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, H, W, C] with C in 1, 3; got {images.dtype} {images.shape}")
    return atomic_save_npz(path, arr_0=images, **extra)
