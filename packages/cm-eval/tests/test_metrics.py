"""Inception Score, precision/recall and class accuracy against plain references."""

import numpy as np
import pytest
import torch
from cm_eval import class_accuracy, inception_score, knn_radii, precision_recall


def _is_reference(logits, splits):
    """ADM evaluator's formula, in numpy: exp(mean_x Σ_y p(y|x)(log p(y|x) − log p(y)))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


def test_inception_score_known_values_and_reference():
    assert inception_score(np.zeros((100, 7)), splits=4)[0] == pytest.approx(1.0, abs=1e-12)
    confident = np.full((1000, 10), -50.0)
    confident[np.arange(1000), np.arange(1000) % 10] = 50.0
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=1e-9)
    logits = np.random.default_rng(0).standard_normal((503, 20)) * 3
    mean, std = inception_score(torch.from_numpy(logits), splits=5)
    ref_mean, ref_std = _is_reference(logits, 5)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=0)


def _pr_reference(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, 1)[:, k]  # index 0 is the point itself

    def covered(q, s, r):
        return np.mean([any(np.sqrt(((qi - sj) ** 2).sum()) <= rj for sj, rj in zip(s, r)) for qi in q])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((60, 3))
    fake = 0.5 * rng.standard_normal((50, 3)) + 0.7
    pr = precision_recall(real, fake, k=3, batch_size=16)
    p_ref, r_ref = _pr_reference(real, fake, 3)
    assert pr["precision"] == pytest.approx(p_ref) and pr["recall"] == pytest.approx(r_ref)
    assert 0 < pr["recall"] < pr["precision"] <= 1  # the narrow fake set sits inside the real one


def test_precision_recall_extremes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((80, 5))
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(x, x + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Mode dropping: fakes cover one of two real clusters -> precision high, recall about half.
    real = np.concatenate([rng.standard_normal((200, 2)) - 10, rng.standard_normal((200, 2)) + 10])
    fake = rng.standard_normal((200, 2)) - 10
    pr = precision_recall(real, fake)
    assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.55
    r = knn_radii(x, k=1)
    d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x)) + torch.eye(80) * 1e9
    torch.testing.assert_close(r, d.min(1).values, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(x, x[:, :3])


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, [0, 1, 1, 1]) == 0.75
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(logits, [0, 1])
