"""A small CNN for scikit-learn's 8×8 handwritten digits, and the script that trains it.

Input convention: float images [B, 1, H, W] (or [B, 3, H, W], averaged to gray, or [B, H, W]) with
values in [-1, 1] (the data range the samplers produce; pixel = value/16·2 − 1 for the raw
0…16 digits). Any H×W is resized to the native 8×8 (bilinear with antialiasing), so images
that were upsampled to 16×16 or 32×32 for training a generator can be fed as they are.

Outputs ``{"features": [B, 64], "logits": [B, 10]}``: ``features`` is the penultimate layer
(post-ReLU), the embedding for "FD-digits"; ``logits`` give class accuracy of labelled samples.

Train (reproducible, ~1 min on 2 CPU cores)::

    python -m cm_eval.digits_classifier --out packages/cm-eval/src/cm_eval/weights --seed 0

writes ``digits_cnn.pt`` (a state dict, loaded with ``torch.load(weights_only=True)``),
``digits_cnn.json`` (how it was trained, held-out accuracy, file hash) and
``digits_ref_stats.npz`` (``mu``, ``sigma`` of the features of all 1797 real digits).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cm_nets.files import atomic_save_npz, atomic_write_bytes, atomic_write_json
from torch import nn

__all__ = [
    "DigitsClassifier",
    "load_digits_classifier",
    "load_digits_data",
    "digits_reference_stats",
    "train",
    "NATIVE_SIZE",
    "FEATURE_DIM",
    "TEST_FRACTION",
    "SPLIT_SEED",
]

NATIVE_SIZE = 8
FEATURE_DIM = 64
TEST_FRACTION = 0.25
SPLIT_SEED = 0
WEIGHTS_FILE = "digits_cnn.pt"


class DigitsClassifier(nn.Module):
    """conv(1→32) → conv(32→64) → maxpool → conv(64→64) → fc(1024→64) [features] → fc(64→10)."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Bring [B, H, W] / [B, 1|3, H, W] images in [-1, 1] to [B, 1, 8, 8] float32."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                "DigitsClassifier expects a floating-point tensor in [-1, 1]; convert uint8 with x/127.5 - 1"
            )
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"DigitsClassifier expects [B, H, W] or [B, 1|3, H, W], got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (NATIVE_SIZE, NATIVE_SIZE):
            x = F.interpolate(x, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(x)
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.relu(self.conv3(h))
        features = F.relu(self.fc1(h.flatten(1)))
        return {"features": features, "logits": self.fc2(features)}


def _shipped(name: str) -> Path:
    return Path(str(resources.files("cm_eval") / "weights" / name))


def load_digits_classifier(weights_path=None) -> DigitsClassifier:
    """The trained classifier in eval mode; ``weights_path`` defaults to the weights shipped with cm-eval."""
    path = Path(weights_path) if weights_path is not None else _shipped(WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"digits classifier weights not found at {path}; retrain with "
            "`python -m cm_eval.digits_classifier --out DIR` or reinstall cm-eval"
        )
    net = DigitsClassifier()
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = set(net.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{path} is not a DigitsClassifier state dict: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def digits_reference_stats(path=None) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"}`` of the shipped classifier's features over all 1797 real digits."""
    from .stats import load_stats

    return load_stats(path if path is not None else _shipped("digits_ref_stats.npz"))


def load_digits_data(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ([N, 1, 8, 8] float32 in [-1, 1], [N] int64 labels).

    ``split`` is "train", "test" (the held-out 25%, stratified, fixed by ``SPLIT_SEED``) or "all".
    Needs scikit-learn (``pip install cm-eval[digits]``); the data ship with it, nothing is downloaded.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data need scikit-learn: pip install 'cm-eval[digits]'") from e
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    if split == "all":
        return images, labels
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), bool)
    for c in range(10):
        idx = np.flatnonzero(d.target == c)
        test[rng.permutation(idx)[: int(round(TEST_FRACTION * len(idx)))]] = True
    keep = torch.from_numpy(test if split == "test" else ~test)
    return images[keep], labels[keep]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # Random ±1 pixel shifts (padding with background −1) and small Gaussian noise: generator
    # samples are rarely centred exactly, and the features should not hinge on it.
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (b,), generator=g), torch.randint(0, 3, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(b)])
    return out + 0.05 * torch.randn(out.shape, generator=g)


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(images)["logits"].argmax(1) == labels).double().mean().item()


def train(out_dir, *, seed: int = 0, epochs: int = 60, batch_size: int = 64, lr: float = 2e-3) -> dict:
    """Train on the "train" split, report accuracy on "test", write weights, stats and a JSON."""
    # Deterministic kernels and a seeded global RNG (weight init) for this call only.
    # One thread: the network is tiny, so threads only add synchronization (and slow down badly
    # on a shared machine); results do not depend on the thread count.
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _train(out_dir, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _train(out_dir, *, seed: int, epochs: int, batch_size: int, lr: float) -> dict:
    from .stats import FeatureStats

    g = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_data("train")
    x_test, y_test = load_digits_data("test")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t0 = time.time()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(y_train), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(_augment(x_train[idx], g))["logits"], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    net.eval()
    out_dir = Path(out_dir)
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, buf)
    weights = atomic_write_bytes(out_dir / WEIGHTS_FILE, buf.getvalue())
    x_all, _ = load_digits_data("all")
    stats = FeatureStats()
    with torch.no_grad():
        stats.update(net(x_all)["features"])
    atomic_save_npz(out_dir / "digits_ref_stats.npz", mu=stats.mean(), sigma=stats.cov())
    info = {
        "model": "cm_eval.digits_classifier.DigitsClassifier",
        "data": "sklearn.datasets.load_digits (1797 images, 8x8, values 0..16 mapped to [-1, 1])",
        "split": {
            "test_fraction": TEST_FRACTION,
            "stratified": True,
            "split_seed": SPLIT_SEED,
            "n_train": len(y_train),
            "n_test": len(y_test),
        },
        "training": {
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "lr": lr,
            "lr_schedule": "cosine",
            "augmentation": "random ±1 px shift, N(0, 0.05²) noise",
        },
        "train_accuracy": accuracy(net, x_train, y_train),
        "test_accuracy": accuracy(net, x_test, y_test),
        "reference_stats": "digits_ref_stats.npz: mu, sigma of 64-d features over all 1797 images",
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "train_seconds": round(time.time() - t0, 1),
        "command": f"python -m cm_eval.digits_classifier --out DIR --seed {seed} --epochs {epochs}",
    }
    atomic_write_json(out_dir / "digits_cnn.json", info)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the cm-eval digits classifier (FD-digits features).")
    p.add_argument("--out", required=True, help="output folder for digits_cnn.pt/.json and digits_ref_stats.npz")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--epochs", type=int, default=60, help="epochs (default 60)")
    args = p.parse_args(argv)
    info = train(args.out, seed=args.seed, epochs=args.epochs)
    print(json.dumps({k: info[k] for k in ("train_accuracy", "test_accuracy", "train_seconds")}))
    return 0


if __name__ == "__main__":
    main()
