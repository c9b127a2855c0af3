"""run_demo's file handling: it never overwrites without consent and never leaves half a report.

(The demo's numbers are checked end to end by tools/tests/test_demo.py through `cm demo --quick`.)
"""

import pytest
from cm_cli import demo


def _fake_result():
    return {"quick": True, "table": [], "text": "t", "sections": [{"heading": "h", "text": "x"}]}


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        demo.run_demo(out, quick=True)
    assert (out / "mine.txt").read_text() == "keep"


def test_an_interrupted_demo_leaves_the_previous_report(tmp_path, monkeypatch):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "report.html").write_text("old report")

    def interrupted(work, budget, quick, log):
        (work / "report.html").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, quick=True, overwrite=True, log=lambda m: None)
    assert (out / "report.html").read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]  # no temporary folder left behind


def test_a_complete_demo_replaces_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "stale.png").write_bytes(b"old")
    monkeypatch.setattr(demo, "_run", lambda work, budget, quick, log: _fake_result())
    result = demo.run_demo(out, quick=True, overwrite=True, log=lambda m: None)
    assert result["report"] == str(out / "report.html")
    assert "<h2>h</h2>" in (out / "report.html").read_text()
    assert (out / "report.json").is_file() and not (out / "stale.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-out"]


def test_quick_budget_is_smaller_everywhere():
    quick, full = demo.QUICK, demo.FULL
    for field in ("teacher_steps", "ect_steps", "ict_steps", "bcm_steps", "eval_samples"):
        assert getattr(quick, field) < getattr(full, field)


def test_threads_are_set_for_the_run_and_restored(tmp_path, monkeypatch):
    import torch

    seen = []

    def fake(work, budget, quick, log):
        seen.append(torch.get_num_threads())
        return _fake_result()

    monkeypatch.setattr(demo, "_run", fake)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run_demo(tmp_path / "a", quick=True, threads=1, log=lambda m: None)
        assert seen == [1] and torch.get_num_threads() == 2
        demo.run_demo(tmp_path / "b", quick=True, threads=None, log=lambda m: None)
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        demo.run_demo(tmp_path / "c", quick=True, threads=0)
