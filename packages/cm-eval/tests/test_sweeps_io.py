"""NFE sweeps, the ternary search, reports and plots; the optional DINOv2 extractor.

(The PNG codec and image grid are cm_nets.files': packages/cm-nets/tests/test_files.py.)
"""

import json
import math

import numpy as np
import pytest
import torch
from cm_eval import (
    best_two_step_sigma,
    decode_png,
    nfe_sweep,
    plot_metric_vs_nfe,
    save_sample_grid,
    ternary_search,
    write_report,
)
from cm_eval._testing import GaussianImages


def test_ternary_search_finds_the_minimum_of_a_unimodal_function():
    calls = []

    def objective(sigma):
        calls.append(sigma)
        return (math.log(sigma) - math.log(2.4)) ** 2

    r = ternary_search(objective, 0.05, 20.0, iters=20)
    assert r["best"] == pytest.approx(2.4, rel=1e-3)
    assert len(calls) == len(set(calls)) == len(r["evaluations"])  # no point evaluated twice
    lin = ternary_search(lambda x: abs(x - 0.821), 0.0, 2.0, iters=30, log_space=False)
    assert lin["best"] == pytest.approx(0.821, abs=1e-4)
    with pytest.raises(ValueError, match="lo"):
        ternary_search(objective, 0.0, 1.0)


def _moment_distance(shape, target_std):
    # A cheap stand-in for FID: squared distance of per-pixel mean and std to the data's.
    f = GaussianImages(shape, std=target_std)
    mean = f.mixture.means[0].reshape(shape)

    def metric(x):
        x = x.double()
        return ((x.mean(0) - mean) ** 2).mean().item() + ((x.std(0) - target_std) ** 2).mean().item()

    return f, metric


def test_nfe_sweep_report_and_plot(tmp_path):
    f, metric = _moment_distance((1, 4, 4), 0.2)
    # A model that is exact except for a bias at large σ (the 1-step sample is off; re-noising
    # to small σ and denoising there repairs it), so the metric improves with NFE.
    biased = lambda x, sigma, **c: f(x, sigma) + (0.3 if sigma > 5 else 0.0)
    sweep = nfe_sweep(
        biased,
        metric,
        {"karras": [[80.0], [80.0, 1.0], [80.0, 2.0, 0.5]], "other": [[80.0, 3.0]]},
        seeds=range(256),
        shape=(1, 4, 4),
    )
    values = [row["metric"] for row in sweep["karras"]]
    assert [row["nfe"] for row in sweep["karras"]] == [1, 2, 3]
    assert values[0] > 10 * values[1] and values[2] < values[0]
    report = write_report(tmp_path / "report.json", {"sweep": sweep, "nan": float("nan"), "np": np.float32(1.5)})
    loaded = json.loads(report.read_text())
    assert loaded["sweep"]["karras"][1]["sigmas"] == [80.0, 1.0] and loaded["nan"] == "nan" and loaded["np"] == 1.5
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'cm-eval[plots]')")
    png = plot_metric_vs_nfe(sweep, tmp_path / "fd_vs_nfe.png", metric_name="moment distance", log_y=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_best_two_step_sigma_on_a_model_that_is_exact_only_below_a_threshold():
    f, metric = _moment_distance((1, 4, 4), 0.2)
    # Exact for σ ≤ 1.5, biased above: the best middle σ lies at or below 1.5, not near the ends.
    model = lambda x, sigma, **c: f(x, sigma) + (0.5 if sigma > 1.5 else 0.0)
    r = best_two_step_sigma(model, metric, seeds=range(128), shape=(1, 4, 4), lo=0.01, hi=20.0, iters=6)
    assert 0.01 < r["best"] <= 1.5 and r["best_value"] < 0.05
    assert len(r["evaluations"]) <= 2 * 6 + 1


def test_bcm_sweeps_count_nfe_and_search_the_chains_middle():
    f = GaussianImages((1, 4, 4))
    seen = []
    spy = lambda x, sigma, sigma_end=0.002, **c: seen.append((sigma, sigma_end)) or f(x, sigma, sigma_end)
    sweep = nfe_sweep(
        spy,
        lambda x: 0.0,
        {"chains": [[80.0, 0.002], [80.0, 3.0, 0.002]]},
        seeds=2,
        shape=(1, 4, 4),
        sampler="bcm-mixture",
        zigzag=[(0.12, 0.4)],
    )
    assert [r["nfe"] for r in sweep["chains"]] == [3, 4]  # jumps + 2 per zigzag round
    seen.clear()
    best_two_step_sigma(spy, lambda x: 0.0, seeds=2, shape=(1, 4, 4), sampler="bcm-ancestral", iters=1, sigma_end=0.01)
    assert seen[:2] == [(80.0, seen[0][1]), (seen[0][1], 0.01)]  # [σ_max, σ_mid, σ_end]: two jumps


def test_sample_grid(tmp_path):
    x = torch.linspace(-1, 1, 6 * 3 * 4 * 4).reshape(6, 3, 4, 4)
    grid = decode_png(save_sample_grid(x, tmp_path / "grid.png", ncol=4).read_bytes())
    assert grid.shape == (2 * 5 + 1, 4 * 5 + 1, 3)
