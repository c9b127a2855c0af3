"""`cm demo --quick` end to end: trains all four models, scores them and writes the report.

The quick budget (about a minute on 2 CPU cores) is too small for good samples; the checks are
what any working run must show: finite numbers, the documented table, every picture in the
page, and models far better than noise (FD-digits of pure noise is ~1,100, chance accuracy 10 %).
"""

import json
import math
import re

import pytest
from click.testing import CliRunner
from cm_cli.main import cli


def test_missing_optional_needs_fail_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from cm_cli import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(demo, "_run_demo", lambda *a, **k: pytest.fail("the demo started without matplotlib"))
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "cm demo needs matplotlib (the report's plots): pip install matplotlib" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_cm_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.json").read_text()
    assert ".tmp-" not in text  # paths point into the output folder, not the temporary one
    report = json.loads(text)
    rows = report["table"]
    got = {(r["model"], r["nfe"]) for r in rows}
    assert got == (
        {("teacher", k) for k in (3, 5, 9, 35)}
        | {(m, k) for m in ("ECT", "ICT", "BCM") for k in (1, 2, 4)}
        | {(m, k) for m in ("sCD", "MeanFlow") for k in (1, 2)}
    )
    for r in rows:
        assert math.isfinite(r["fd_digits"]) and r["fd_digits"] > 0
        assert 0 <= r["class_acc"] <= 1 and math.isfinite(r["ode_mse"])
    by = {(r["model"], r["nfe"]): r for r in rows}
    # Far better than noise, and the teacher improves with NFE (Heun 35 vs 3 NFE).
    assert by[("teacher", 35)]["fd_digits"] < by[("teacher", 3)]["fd_digits"]
    assert by[("ECT", 1)]["fd_digits"] < 800 and by[("ECT", 1)]["class_acc"] > 0.5
    assert by[("teacher", 35)]["ode_mse"] < by[("teacher", 3)]["ode_mse"]
    # Every 2-NFE row's middle point comes from its own search on other seeds (sCD and MeanFlow in time).
    search = report["two_step_search"]
    assert set(search) == {"ect", "ict", "bcm", "scd", "meanflow"}
    scd2, mf2 = by[("sCD", 2)]["sigmas"], by[("MeanFlow", 2)]["sigmas"]
    assert scd2[0] == round(math.pi / 2, 4) and scd2[1] == pytest.approx(math.atan(search["scd"]["best"] / 0.5), abs=1e-4)
    assert mf2[0] == 1.0 and mf2[2] == 0.0 and mf2[1] == pytest.approx(search["meanflow"]["best"] / (1 + search["meanflow"]["best"]), abs=1e-4)
    inv = report["edits"]["bcm_inversion"]
    assert all(math.isfinite(v["mse"]) for v in inv["variants"]) and len(inv["variants"]) == 4
    partial = next(v for v in inv["variants"] if v["invert_sigmas"] == [0.07, 2.0])
    assert partial["mse"] < inv["mse_fresh_noise"]  # inversion keeps information about the image
    # The printed table and the page.
    assert "FD-digits" in result.output and "report.html" in result.output
    # Every training run used the demo's one thread (not cm-train's own choice from the free cores).
    assert result.output.count("cpu threads: 1 (run.threads = 1)") == 6
    html = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,', html)
    assert len(images) == len(rows) + 4 + 3 + 1  # sample grids, 4 plots, 3 edits, BCM pairs: nothing missing
    # Never overwrites without consent.
    again = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in (again.stderr if hasattr(again, "stderr") else again.output)
