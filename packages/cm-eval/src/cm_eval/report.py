"""Reports people read: a self-contained HTML page (tables, images inlined), plain-text tables for
the terminal, and line plots of curves (training loss, a metric against NFE).

The HTML embeds every image as a data URI so the one file can be mailed or attached to an issue;
small images (8×8 digits) are scaled up with nearest-neighbour rendering so pixels stay pixels.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cm_nets.files import atomic_write_bytes

__all__ = ["format_table", "html_report", "plot_curves", "plot_image_panels"]


def _cell(value, digits: int) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 10**digits or abs(value) < 10 ** (-digits + 1)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits - 1}f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence], *, digits: int = 4) -> str:
    """A fixed-width text table (numbers right-aligned, ``digits`` significant figures)."""
    cells = [[_cell(v, digits) for v in row] for row in rows]
    for row in cells:
        if len(row) != len(columns):
            raise ValueError(f"every row needs {len(columns)} cells, got {len(row)}: {row}")
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(columns))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule] + [line(r) for r in cells])


def _image_tag(image, caption: str, scale: int) -> str:
    data = Path(image).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{image} is not a PNG file")
    width = int.from_bytes(data[16:20], "big")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    style = f"width:{width * scale}px;image-rendering:pixelated" if scale > 1 else ""
    return (
        f'<figure><img src="{uri}" alt="{html.escape(caption)}" style="{style}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table_html(columns, rows, digits: int) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:420px}
p.note{color:#555;font-size:.92em}
"""


def html_report(path, *, title: str, sections: Sequence[Mapping], intro: str = "", digits: int = 4) -> Path:
    """Write a self-contained HTML report atomically.

    Each section: ``{"heading": str, "text": str | [str, …] (paragraphs), "table": {"columns": [...],
    "rows": [[...], …]}, "images": [{"path": png, "caption": str, "scale": int}, …],
    "notes": [str, …]}``; every key but the heading is optional.
    """
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section['heading'])}</h2>")
        text = section.get("text", ())
        for para in [text] if isinstance(text, str) else text:
            parts.append(f"<p>{html.escape(para)}</p>")
        table = section.get("table")
        if table:
            parts.append(_table_html(table["columns"], table["rows"], digits))
        for image in section.get("images", ()):
            parts.append(_image_tag(image["path"], image.get("caption", ""), int(image.get("scale", 1))))
        for note in section.get("notes", ()):
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
    parts.append("</body></html>\n")
    return atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
    log_y: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """A PNG line plot, one line per ``{name: (xs, ys)}``; ``hlines`` adds labelled dashed levels."""
    from .sweeps import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        ax.plot(xs, ys, marker="o" if len(xs) <= 12 else None, label=name)
    for name, level in (hlines or {}).items():
        ax.axhline(level, linestyle="--", color="grey", linewidth=1)
        ax.annotate(name, (1, level), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    try:
        from matplotlib.ticker import FuncFormatter
    except ImportError as e:  # pragma: no cover - _pyplot() above already needs matplotlib
        raise ImportError("plots need matplotlib: pip install 'cm-eval[plots]'") from e

    def minor(v, _):  # 2, 3, 4 and 6 × each power of ten, as plain numbers
        if v <= 0:
            return ""
        lead = v / 10 ** math.floor(math.log10(v) + 1e-9)
        return f"{v:g}" if any(abs(lead - k) < 1e-6 for k in (2, 3, 4, 6)) else ""

    for on, axis, scale in ((log_x, ax.xaxis, ax.set_xscale), (log_y, ax.yaxis, ax.set_yscale)):
        if on:  # "4" and "0.6", not "4×10⁰" and "6×10⁻¹"
            scale("log")
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(minor))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_image_panels(panels: Sequence[tuple[str, object]], path, *, ncol: int = 3, panel_inches: float = 2.6) -> Path:
    """A PNG figure of titled image panels, ``[(title, PNG path or uint8 array [H, W(, C)]), …]``,
    drawn pixel-exact (nearest neighbour): e.g. sample grids of several models side by side."""
    import numpy as np
    from cm_nets.files import load_png

    from .sweeps import _pyplot

    if not panels:
        raise ValueError("panels must hold at least one (title, image)")
    plt = _pyplot()
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(panel_inches * ncol, panel_inches * nrow + 0.3), dpi=120, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, panels):
        array = load_png(image) if isinstance(image, (str, Path)) else np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        ax.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
