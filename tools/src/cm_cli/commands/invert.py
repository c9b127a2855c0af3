"""``cm invert`` and ``cm reconstruct``: BCM inversion, image → noise → image (Li & He 2024, Sec. 4.3)."""

from __future__ import annotations

import click

from .._common import (
    CliError,
    atomic_save_npz,
    batch_option,
    check_out,
    check_shape,
    class_label_option,
    default_sigmas,
    device_option,
    echo_json,
    json_option,
    labels_for,
    load_images,
    load_model,
    network_option,
    overwrite_option,
    parse_floats,
    progress,
    renamed_option,
)


def need_bcm(model, command: str) -> None:
    if model.kind != "bcm":
        raise CliError(
            f"{command} needs a BCM checkpoint; {model.checkpoint} was trained with {model.objective!r} "
            f"(a {model.kind} model)"
        )


def invert_sigmas(model, jumps: int | None, sigmas: str | None) -> list[float]:
    """--sigmas as given; else cm_core.inversion_sigmas: --jumps k: k+1 Karras points from 0.07 up to
    σ_max; no --jumps: BCM's 0.07 → 15 → σ_max."""
    import cm_core

    if sigmas is not None:
        return parse_floats(sigmas, "--sigmas")
    return cm_core.inversion_sigmas(jumps, sigma_max=model.sigma_max)


def _inputs(model, images, limit, class_label, device):
    x, labels = load_images(images, limit)
    check_shape(x, model, f"the images of {images}")
    labels = labels_for(model, len(x), class_label, labels)
    return x.to(device), labels


def _sigma_options(f):
    f = click.option("--sigmas", default=None, help="Increasing inversion σ list, e.g. 0.07,15,80.")(f)
    f = click.option(
        "--jumps",
        type=click.IntRange(1, 100),
        default=None,
        help="Inversion jumps k: k+1 Karras points 0.07 → σ_max [default: BCM's 0.07 → 15 → σ_max].",
    )(f)
    return renamed_option("--steps", "--jumps", "jumps", type=click.IntRange(1, 100))(f)


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--input", "images", required=True, help="A PNG, a folder of PNGs, an .npz (arr_0) or `digits`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="LATENTS.npz to write.")
@_sigma_options
@click.option("--no-noise", is_flag=True, help="Skip the small σ_0 noise added before the first jump.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Invert only the first N images.")
@batch_option(64)
@class_label_option
@network_option
@device_option
@overwrite_option
def invert(checkpoint, images, out, sigmas, jumps, no_noise, limit, batch_size, class_label, network, device,
           overwrite):  # fmt: skip
    """Invert images to noise with a BCM checkpoint.

    Writes `latents` [N, C, H, W] (at the last σ; divide by it for unit variance), `sigmas` and,
    for conditional models, `labels`. Image i's σ_0 noise comes from seed i.

    \b
    Example:
      cm invert runs/digits-bcm --input digits --out latents.npz
    """
    import cm_core
    import cm_eval
    import numpy as np
    import torch

    out = check_out(out, overwrite)
    model = load_model(checkpoint, network, device)
    need_bcm(model, "cm invert")
    ts = invert_sigmas(model, jumps, sigmas)
    x, labels = _inputs(model, images, limit, class_label, device)
    latents = []
    chunks = [range(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
    with torch.no_grad():
        for idx in progress("inverting")(chunks):
            xb = x[idx.start : idx.stop]
            noise = cm_eval.PerImageNoise(list(idx))  # image i's σ_0 noise from seed i
            cond = model.cond(None if labels is None else labels[idx.start : idx.stop].to(device))
            latent = cm_core.bcm_invert(model.function, xb, ts, add_noise=not no_noise, randn_like=noise.like, **cond)
            latents.append(latent.float().cpu())
    arrays = {"latents": torch.cat(latents).numpy(), "sigmas": np.array(ts, np.float64)}
    if labels is not None:
        arrays["labels"] = labels.numpy()
    atomic_save_npz(out, **arrays)
    click.echo(f"wrote {out}: {len(x)} latents at σ={ts[-1]:g} (sigmas {ts}, {len(ts) - 1} NFE)")


def inversion_result(model, images, limit, class_label, device, jumps, sigmas, reconstruct, batch_size, grid=None):
    import cm_eval

    x, labels = _inputs(model, images, limit, class_label, device)
    back = parse_floats(reconstruct, "--reconstruct-sigmas") or default_sigmas(model, "bcm-ancestral", 1)
    return cm_eval.inversion_error(
        model.function,
        x,
        invert_sigmas=invert_sigmas(model, jumps, sigmas),
        reconstruct_sigmas=back,
        batch_size=batch_size,
        side_by_side=grid,
        labels=labels,
        progress=progress("invert+reconstruct"),
    )


def report_line(r: dict) -> str:
    return (
        f"MSE {r['mse']:.6g}  PSNR {r['psnr']:.2f} dB  ({r['num_images']} images, NFE {r['nfe']}: "
        f"up {r['invert_sigmas']}, down {r['reconstruct_sigmas']})"
    )


def reconstruct_options(f):
    f = click.option(
        "--reconstruct-sigmas", "reconstruct", default=None, help="Decreasing σ list down [default: σ_max,σ_min]."
    )(f)
    f = _sigma_options(f)
    return f


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--input", "images", required=True, help="A PNG, a folder of PNGs, an .npz (arr_0) or `digits`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Grid PNG: originals over reconstructions.")
@reconstruct_options
@click.option("--limit", type=click.IntRange(min=1), default=16, show_default=True, help="Images to use.")
@batch_option(64)
@class_label_option
@network_option
@device_option
@json_option
@overwrite_option
def reconstruct(checkpoint, images, out, sigmas, jumps, reconstruct, limit, batch_size, class_label, network, device,
                json_path, overwrite):  # fmt: skip
    """Invert images with a BCM checkpoint, reconstruct them, print MSE and PSNR.

    \b
    Example:
      cm reconstruct runs/digits-bcm --input digits --limit 16 --out recon.png
    """
    out = check_out(out, overwrite)
    if json_path:
        check_out(json_path, overwrite)
    model = load_model(checkpoint, network, device)
    need_bcm(model, "cm reconstruct")
    r = inversion_result(model, images, limit, class_label, device, jumps, sigmas, reconstruct, batch_size, grid=out)
    click.echo(report_line(r))
    click.echo(f"wrote {out}")
    echo_json(r, json_path, overwrite)


COMMANDS = [invert, reconstruct]
