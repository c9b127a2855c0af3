"""The shipped digits classifier: held-out accuracy, FD-digits, reproducible training."""

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the digits data ship with scikit-learn (pip install 'cm-eval[digits]')")

from cm_eval import (  # noqa: E402
    digits_class_accuracy,
    digits_reference_stats,
    fd_digits,
    frechet_distance_from_features,
    load_digits_classifier,
    load_digits_data,
)
from cm_eval.digits_classifier import train  # noqa: E402

WEIGHTS = Path(str(resources.files("cm_eval") / "weights"))


@pytest.fixture(scope="module")
def net():
    return load_digits_classifier()


def test_shipped_weights_reach_97_percent_on_the_held_out_split(net):
    x, y = load_digits_data("test")
    assert len(y) == 450 and set(y.tolist()) == set(range(10))
    x_train, _ = load_digits_data("train")
    assert len(x_train) + len(x) == 1797
    with torch.no_grad():
        acc = (net(x)["logits"].argmax(1) == y).double().mean().item()
    assert acc >= 0.97, acc
    assert digits_class_accuracy(x, y, classifier=net) == pytest.approx(acc)
    # Upsampled inputs (how a generator may be trained: 8×8 → 32×32 bilinear) are resized back.
    x32 = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    assert digits_class_accuracy(x32, y, classifier=net) >= 0.95
    # Wrong labels score at chance.
    assert digits_class_accuracy(x, (y + 1) % 10, classifier=net) < 0.05


def test_shipped_metadata_describes_the_weights():
    info = json.loads((WEIGHTS / "digits_cnn.json").read_text())
    assert info["sha256"] == hashlib.sha256((WEIGHTS / "digits_cnn.pt").read_bytes()).hexdigest()
    assert info["test_accuracy"] >= 0.97 and info["split"]["n_test"] == 450
    assert "--seed" in info["command"]


def test_fd_digits_small_between_real_halves_large_to_noise(net):
    x, _ = load_digits_data("all")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f1, f2 = net(x[perm[:898]])["features"], net(x[perm[898:]])["features"]
        noise = net(torch.rand(898, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)["features"]
        blank = net(-torch.ones(50, 1, 8, 8) + 0.1 * torch.randn(50, 1, 8, 8))["features"]
    fd_halves = frechet_distance_from_features(f1, f2)
    fd_noise = frechet_distance_from_features(f1, noise)
    assert fd_noise > 30 * fd_halves, (fd_halves, fd_noise)
    assert frechet_distance_from_features(f1, blank) > 30 * fd_halves
    # Against the shipped statistics of all 1797 digits: real test images are close, noise is far.
    xt, _ = load_digits_data("test")
    fd_real = fd_digits(xt, classifier=net)
    assert fd_real < fd_noise / 10
    assert fd_digits(torch.rand(450, 1, 16, 16) * 2 - 1, classifier=net) > 10 * fd_real
    assert digits_reference_stats()["sigma"].shape == (64, 64)


def test_training_script_is_reproducible(tmp_path):
    a = train(tmp_path / "a", seed=3, epochs=1)
    b = train(tmp_path / "b", seed=3, epochs=1)
    assert a["sha256"] == b["sha256"]
    assert (tmp_path / "a" / "digits_ref_stats.npz").is_file()
    load_digits_classifier(tmp_path / "a" / "digits_cnn.pt")  # loads as shipped weights do


def test_weight_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="retrain"):
        load_digits_classifier(tmp_path / "missing.pt")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="missing"):
        load_digits_classifier(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="split"):
        load_digits_data("val")


def test_compute_stats_takes_uint8_nhwc_and_float_batches_alike(net):
    from cm_eval import compute_stats, to_uint8

    x, _ = load_digits_data("test")
    as_uint8 = to_uint8(x)  # [N, 8, 8, 1], EDM rounding
    assert as_uint8.shape == (450, 8, 8, 1)
    s_u8 = compute_stats(net, as_uint8, key="features", batch_size=100)
    s_float = compute_stats(net, [x[:200], x[200:]], key="features")  # an iterable of batches
    assert s_u8.n == s_float.n == 450
    np.testing.assert_allclose(s_u8.mean(), s_float.mean(), atol=0.05 * np.abs(s_float.mean()).max())
