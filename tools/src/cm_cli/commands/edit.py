"""``cm edit``: zero-shot editing with a consistency model (CM paper, Algorithm 4), written as a grid PNG."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import (
    NAMED_MASKS,
    CliError,
    check_out,
    check_shape,
    class_label_option,
    default_sigmas,
    device_option,
    labels_for,
    load_images,
    load_model,
    network_option,
    overwrite_option,
    parse_floats,
    renamed_option,
)


def _common(f):
    """Options every editing task shares (applied bottom-up, so they list in this order)."""
    for deco in reversed(
        [
            click.argument("checkpoint", type=click.Path()),
            click.option(
                "--input",
                "images",
                required=True,
                help="A PNG, a folder of PNGs, an .npz (arr_0 uint8 NHWC) or `digits` (held-out test digits).",
            ),
            click.option("--out", required=True, type=click.Path(dir_okay=False), help="Grid PNG to write."),
            click.option(
                "--nfe",
                type=click.IntRange(1, 1000),
                default=8,
                show_default=True,
                help="Network evaluations: the σ list of `cm sample --nfe` (Karras grid points from σ_max down).",
            ),
            renamed_option("--steps", "--nfe", "nfe", type=click.IntRange(1, 1000)),
            click.option("--sigmas", default=None, help="Explicit σ schedule, e.g. 80,10,2,0.5 (overrides --nfe)."),
            click.option("--limit", type=click.IntRange(min=1), default=8, show_default=True, help="Images to edit."),
            click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Noise seed."),
            class_label_option,
            network_option,
            device_option,
            overwrite_option,
        ]
    ):
        f = deco(f)
    return f


def sigma_consistency(f):
    """sCM / MeanFlow models as consistency functions of σ (exact; cm_core.continuous), others as they are."""
    from cm_core.continuous import sigma_consistency as wrap

    return wrap(f)


def _setup(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device, overwrite):
    import torch

    out = check_out(out, overwrite)
    model = load_model(checkpoint, network, device)
    if model.kind == "diffusion":
        raise CliError(
            f"editing needs a consistency or BCM checkpoint; {model.checkpoint} is a diffusion model "
            f"(objective {model.objective!r})"
        )
    x, labels = load_images(images, limit)
    check_shape(x, model, f"the images of {images}")
    labels = labels_for(model, len(x), class_label, labels)
    ts = parse_floats(sigmas, "--sigmas") or default_sigmas(model, "multistep", nfe)
    kw = dict(generator=torch.Generator().manual_seed(seed), sigma_min=model.sigma_min, clip=1.0)
    kw.update(model.cond(None if labels is None else labels.to(device)))
    return model, x.to(device), out, ts, kw


def _save(out: Path, rows: list, what: str) -> None:
    import cm_eval
    import torch

    n = len(rows[0])
    cm_eval.save_sample_grid(torch.cat([r.float().cpu() for r in rows]), out, ncol=n)
    click.echo(f"wrote {out}: {n} images, rows {what}")


def _mask(spec: str, x):
    """1 = keep the pixel. A PNG (white = keep) of the images' size, or a named region to regenerate."""
    import cm_eval
    import torch

    h, w = x.shape[-2:]
    if spec in NAMED_MASKS:
        m = torch.ones(h, w)
        region = {
            "left": (slice(None), slice(0, w // 2)),
            "right": (slice(None), slice(w // 2, None)),
            "top": (slice(0, h // 2), slice(None)),
            "bottom": (slice(h // 2, None), slice(None)),
            "center": (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)),
        }[spec]
        m[region] = 0
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"mask {path} does not exist: give a PNG (white = keep) or one of {NAMED_MASKS}")
        png = cm_eval.load_png(path)
        if png.shape[:2] != (h, w):
            raise ValueError(
                f"mask {path} is {png.shape[0]}×{png.shape[1]} but the images are {h}×{w}; make them match"
            )
        m = torch.from_numpy((png[..., 0] >= 128).astype("float32"))
    return m.to(x)[None, None].expand(x.shape[0], x.shape[1], h, w).contiguous()


@click.group()
def edit() -> None:
    """Zero-shot editing: inpaint, colorize, superres, stroke, interpolate.

    Each task writes one grid PNG: originals, degraded inputs and results, one row each.

    \b
    Example:
      cm edit inpaint runs/digits-ict --input digits --mask right --out inpaint.png
    """


@edit.command()
@_common
@click.option(
    "--mask",
    required=True,
    help=f"PNG of the images' size (white = keep) or a region to regenerate: {', '.join(NAMED_MASKS)}.",
)
def inpaint(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device, overwrite, mask):
    """Regenerate the masked-out pixels of each image.

    \b
    Example:
      cm edit inpaint runs/digits-ict --input digits --mask right --out inpaint.png
    """
    import cm_core

    model, x, out, ts, kw = _setup(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device,
                                   overwrite)  # fmt: skip
    m = _mask(mask, x)
    y = cm_core.inpaint(sigma_consistency(model.function), x, m, ts, **kw)
    _save(out, [x, x * m, y], "original / masked (gray = to fill) / inpainted")


@edit.command()
@_common
def colorize(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device, overwrite):
    """Keep each RGB image's luma, generate its colours (needs a 3-channel model).

    \b
    Example:
      cm edit colorize runs/cifar10-ict --input photos/ --out colorized.png
    """
    import cm_core

    model, x, out, ts, kw = _setup(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device,
                                   overwrite)  # fmt: skip
    if x.shape[1] != 3:
        raise ValueError(f"colorize needs RGB images; {model.checkpoint} makes {x.shape[1]}-channel images")
    y = cm_core.colorize(sigma_consistency(model.function), x, ts, **kw)
    _save(out, [x, cm_core.Colorization().grayscale(x), y], "original / grayscale / colorized")


@edit.command()
@_common
@click.option(
    "--patch-size", type=click.IntRange(min=2), default=2, show_default=True, help="Downsampling factor p (p×p)."
)
def superres(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device, overwrite, patch_size):
    """Super-resolve: keep every p×p patch mean of the image, generate the detail.

    \b
    Example:
      cm edit superres runs/digits-ict --input digits --patch-size 2 --out superres.png
    """
    import cm_core

    model, x, out, ts, kw = _setup(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device,
                                   overwrite)  # fmt: skip
    y = cm_core.super_resolve(sigma_consistency(model.function), x, ts, patch_size=patch_size, **kw)
    _save(out, [x, cm_core.SuperResolution(patch_size).downsample(x), y], "original / low-resolution / super-resolved")


@edit.command()
@_common
def stroke(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device, overwrite):
    """Stroke-guided generation (SDEdit-style): start from the painting plus noise.

    \b
    Example:
      cm edit stroke runs/digits-ict --input strokes/ --class-label 3 --nfe 3 --out stroke.png
    """
    import cm_core

    model, x, out, ts, kw = _setup(checkpoint, images, out, nfe, sigmas, limit, seed, class_label, network, device,
                                   overwrite)  # fmt: skip
    y = cm_core.stroke_edit(sigma_consistency(model.function), x, ts, **kw)
    _save(out, [x, x, y], "stroke painting / input / result")


@edit.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--seeds", "seed_pair", required=True, help="Two seeds A,B: the noises to interpolate between.")
@click.option("--points", type=click.IntRange(2, 100), default=8, show_default=True, help="Points along the path.")
@renamed_option("--steps", "--points", "points", type=click.IntRange(2, 100))
@click.option(
    "--nfe", type=click.IntRange(1, 1000), default=1, show_default=True, help="Network evaluations per point."
)
@click.option("--sigmas", default=None, help="Explicit sampling σ list (overrides --nfe).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG row to write.")
@class_label_option
@network_option
@device_option
@overwrite_option
def interpolate(checkpoint, seed_pair, points, nfe, sigmas, out, class_label, network, device, overwrite):
    """Samples along the spherical path between the noises of two seeds (α = 0 … 1).

    The ends are the images `cm sample --seeds A` and `--seeds B` would give (one-step sampling).

    \b
    Example:
      cm edit interpolate runs/digits-ict --seeds 3,7 --points 8 --class-label 5 --out interp.png
    """
    import cm_core
    import cm_eval
    import torch

    try:
        a, b = (int(s) for s in seed_pair.split(","))
    except ValueError:
        raise click.BadParameter(f"{seed_pair!r} is not two seeds A,B (e.g. 3,7)", param_hint="--seeds") from None
    if min(a, b) < 0:
        raise click.BadParameter("seeds must be non-negative", param_hint="--seeds")
    out = check_out(out, overwrite)
    model = load_model(checkpoint, network, device)
    if model.kind == "diffusion":
        raise CliError(f"interpolate needs a consistency or BCM checkpoint; {model.checkpoint} is a diffusion model")
    labels = labels_for(model, 1, class_label)
    ts = parse_floats(sigmas, "--sigmas") or default_sigmas(model, "multistep", nfe)
    z1 = cm_eval.PerImageNoise([a]).randn(model.sample_shape).to(device)
    z2 = cm_eval.PerImageNoise([b]).randn(model.sample_shape).to(device)
    alphas = torch.linspace(0, 1, points).tolist()
    cond = model.cond(None if labels is None else labels.to(device))
    x = cm_core.interpolate(sigma_consistency(model.function), z1, z2, alphas, ts, generator=torch.Generator().manual_seed(a),
                            sigma_min=model.sigma_min, **cond)  # fmt: skip
    _save(out, [x[:, 0]], f"seed {a} → seed {b}, α = {', '.join(f'{al:.2f}' for al in alphas)}")


COMMANDS = [edit]
