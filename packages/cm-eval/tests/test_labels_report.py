"""Explicit class labels in sampling/evaluation, and the HTML/text/plot report writers."""

import base64
import re

import cm_eval
import numpy as np
import pytest
import torch
from cm_eval import format_table, html_report, inversion_error, ode_solving_error, sample_batch, sample_images

SHAPE = (1, 4, 4)


class LabelNet(torch.nn.Module):
    """f(x, σ, class_labels) = x/(1+σ) + label: the label's effect is visible in every pixel."""

    def forward(self, x, sigma, sigma_end=None, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) if torch.is_tensor(sigma) else sigma
        return x / (1 + s) + class_labels.to(x).reshape(-1, *[1] * (x.ndim - 1))


def test_fixed_labels_give_the_image_a_random_draw_of_that_label_gives():
    f = LabelNet()
    drawn, labels = sample_batch(f, [3, 4, 5], SHAPE, [80.0, 1.0], num_classes=10)
    fixed, same = sample_batch(f, [3, 4, 5], SHAPE, [80.0, 1.0], num_classes=10, labels=labels)
    torch.testing.assert_close(fixed, drawn, rtol=0, atol=0)  # z and ε draws unchanged by fixing labels
    assert torch.equal(same, labels)
    other, _ = sample_batch(f, [3, 4, 5], SHAPE, [80.0, 1.0], num_classes=10, labels=(labels + 1) % 10)
    assert not torch.allclose(other, drawn)
    with pytest.raises(ValueError, match="one label per seed"):
        sample_batch(f, [3, 4], SHAPE, [80.0], labels=[1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        sample_batch(f, [3], SHAPE, [80.0], num_classes=10, labels=[10])


def test_labels_are_sliced_with_the_batches():
    f = LabelNet()
    labels = torch.arange(7) % 3
    one = sample_images(f, seeds=7, shape=SHAPE, sigmas=[80.0, 0.5], labels=labels, batch_size=7)
    many = sample_images(f, seeds=7, shape=SHAPE, sigmas=[80.0, 0.5], labels=labels, batch_size=2)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
    # Teacher solutions and the ODE error take labels the same way (a teacher D = the same map).
    res1 = ode_solving_error(f, f, seeds=7, shape=SHAPE, teacher_sigmas=[80.0, 5.0, 0.0], labels=labels, batch_size=3)
    res7 = ode_solving_error(f, f, seeds=7, shape=SHAPE, teacher_sigmas=[80.0, 5.0, 0.0], labels=labels, batch_size=7)
    assert res1["mse"] == pytest.approx(res7["mse"], rel=1e-12)
    with pytest.raises(ValueError, match="one label per seed"):
        ode_solving_error(f, f, seeds=7, shape=SHAPE, labels=labels[:3])
    images = torch.rand(5, *SHAPE) * 2 - 1
    a = inversion_error(f, images, labels=torch.arange(5), batch_size=2)
    b = inversion_error(f, images, labels=torch.arange(5), batch_size=5)
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-12)
    with pytest.raises(ValueError, match="one label per image"):
        inversion_error(f, images, labels=torch.arange(4))


def test_format_table_aligns_and_rounds():
    text = format_table(["model", "NFE", "FD"], [["ECT", 1, 42.6123], ["teacher", 35, 0.000123]])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "NFE", "FD"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["ECT", "1", "42.61"] and lines[3].split() == ["teacher", "35", "1.230e-04"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        format_table(["a", "b", "c"], [[1, 2]])


def test_html_report_is_self_contained_and_escaped(tmp_path):
    grid = cm_eval.save_sample_grid(torch.rand(4, 1, 8, 8) * 2 - 1, tmp_path / "g.png", ncol=2)
    path = html_report(
        tmp_path / "r.html",
        title="T <1>",
        intro="a & b",
        sections=[
            {
                "heading": "H",
                "text": "para",
                "table": {"columns": ["x", "y"], "rows": [["<b>", 1.5]]},
                "images": [{"path": grid, "caption": "cap", "scale": 4}],
                "notes": ["n"],
            }
        ],
    )
    html = path.read_text()
    assert "<title>T &lt;1&gt;</title>" in html and "a &amp; b" in html and "<td>&lt;b&gt;</td>" in html
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(uri) == grid.read_bytes()  # the picture itself is inside the page
    width = cm_eval.load_png(grid).shape[1]
    assert f"width:{width * 4}px;image-rendering:pixelated" in html
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="is not a PNG"):
        html_report(
            tmp_path / "r2.html", title="t", sections=[{"heading": "h", "images": [{"path": tmp_path / "bad.png"}]}]
        )
    assert not (tmp_path / "r2.html").exists()


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = cm_eval.plot_curves(
        {"a": ([1, 2, 4], [3.0, 2.0, 1.5])},
        tmp_path / "p.png",
        xlabel="NFE",
        ylabel="FD",
        log_y=True,
        hlines={"floor": 1.0},
    )
    image = cm_eval.load_png(path)
    assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        cm_eval.plot_curves({"a": ([1, 2], [3.0])}, tmp_path / "q.png", xlabel="x", ylabel="y")


def test_generate_checks_before_making_folders(tmp_path):
    f = LabelNet()
    for out in (tmp_path / "pngs", tmp_path / "s.npz"):
        with pytest.raises(ValueError, match="strictly decreasing"):
            cm_eval.generate(f, out, seeds=3, shape=SHAPE, sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="sampler must be one of"):
        cm_eval.generate(f, tmp_path / "pngs", seeds=3, shape=SHAPE, sigmas=[80.0], sampler="nope")
    with pytest.raises(ValueError, match="class_label 12 needs"):
        cm_eval.generate(f, tmp_path / "pngs", seeds=3, shape=SHAPE, sigmas=[80.0], num_classes=10, class_label=12)
    assert list(tmp_path.iterdir()) == []
    cm_eval.generate(f, tmp_path / "pngs", seeds=3, shape=SHAPE, sigmas=[80.0], num_classes=10, class_label=7)
    assert len(list((tmp_path / "pngs").glob("*.png"))) == 3


def test_progress_hooks_see_every_batch():
    f = LabelNet()
    seen = []

    def progress(iterable):
        items = list(iterable)
        seen.append(len(items))
        return items

    sample_images(f, seeds=5, shape=SHAPE, sigmas=[80.0], labels=torch.zeros(5), batch_size=2, progress=progress)
    ode_solving_error(
        f, f, seeds=5, shape=SHAPE, teacher_sigmas=[80.0, 0.0], labels=torch.zeros(5), batch_size=2, progress=progress
    )
    inversion_error(f, torch.zeros(5, *SHAPE), labels=torch.zeros(5), batch_size=4, progress=progress)
    sweep = cm_eval.nfe_sweep(
        f,
        lambda x: float(x.mean()),
        {"a": [[80.0], [80.0, 1.0]], "b": [[80.0]]},
        seeds=3,
        shape=SHAPE,
        cond={"class_labels": torch.zeros(3)},
        progress=progress,
    )
    assert seen == [3, 3, 2, 3] and [r["nfe"] for r in sweep["a"]] == [1, 2] and len(sweep["b"]) == 1


def test_plot_image_panels(tmp_path):
    pytest.importorskip("matplotlib")
    grid = cm_eval.save_sample_grid(torch.rand(4, 1, 8, 8) * 2 - 1, tmp_path / "g.png", ncol=2)
    rgb = np.zeros((5, 5, 3), np.uint8)
    path = cm_eval.plot_image_panels([("a", grid), ("b", rgb), ("c", grid)], tmp_path / "p.png", ncol=2)
    assert cm_eval.load_png(path).shape[0] > 200
    with pytest.raises(ValueError, match="at least one"):
        cm_eval.plot_image_panels([], tmp_path / "q.png")
