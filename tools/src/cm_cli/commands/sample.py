"""``cm sample``: images from a checkpoint, one per seed, into a PNG folder or an .npz."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import (
    CliError,
    batch_option,
    check_device,
    class_label_option,
    default_sigmas,
    device_option,
    load_model,
    network_option,
    overwrite_option,
    parse_floats,
    parse_pairs,
    progress,
    remove_output,
    renamed_option,
)

# "auto" and the names of cm_core.SAMPLERS (a test checks), spelled out so that `--help` needs no torch.
SAMPLERS = ("auto", "onestep", "multistep", "bcm-ancestral", "bcm-zigzag", "bcm-mixture", "heun", "lcm", "trigflow",
            "meanflow")  # fmt: skip


def plan(model, sampler: str, nfe: int | None, sigmas, heun_steps: int | None, zigzag) -> tuple:
    """(sampler name, σ list, sampler options, NFE) for this checkpoint and these options;
    ``nfe`` / ``heun_steps``: None when not given (``--nfe`` 1, ``--heun-steps`` 18 by default)."""
    import cm_core

    kind = cm_core.function_kind(model.kind)  # which samplers fit is declared with the function kind
    if sampler == "auto":
        sampler = kind.default_sampler
        one_sigma = nfe in (None, 1) and sigmas is None or sigmas is not None and len(sigmas) == 1
        if sampler == "multistep" and one_sigma:
            sampler = "onestep"
    if sampler not in kind.samplers:
        raise CliError(
            f"sampler {sampler!r} does not fit {model.checkpoint}: it is a {model.kind} model "
            f"(objective {model.objective!r}); use --sampler {' or '.join(kind.samplers)}"
        )
    spec = cm_core.get_sampler(sampler)
    if zigzag is not None and "zigzag" not in spec.options:
        raise click.UsageError("--zigzag applies to --sampler bcm-zigzag and bcm-mixture only")
    if spec.count == "heun-steps":
        if nfe is not None or sigmas is not None:
            raise click.UsageError(f"--sampler {sampler} takes --heun-steps (EDM time steps), not --nfe or --sigmas")
        n = heun_steps
    elif heun_steps is not None:
        raise click.UsageError(f"--heun-steps applies to --sampler heun only; {sampler} takes --nfe or --sigmas")
    elif spec.count is None:  # BCM zigzag / mixture: NFE = jumps of the chain + 2 per zigzag round
        if nfe is not None:
            raise click.UsageError(
                f"--nfe does not apply to {sampler}: set its chain with --sigmas and its rounds with --zigzag"
            )
        n = None
    else:
        n = 1 if nfe is None else nfe
        count = len(sigmas) if sigmas is not None else n
        if sampler == "onestep" and count != 1:
            raise click.UsageError(f"--sampler onestep takes one σ; got {count} (use multistep)")
    ts = sigmas if sigmas is not None else default_sigmas(model, sampler, n)
    # The checkpoint's sampling σ_min and re-noising rule, for the samplers that take them.
    options = {k: v for k, v in {"sigma_min": model.sigma_min, "renoise": model.renoise}.items() if k in spec.options}
    if zigzag is not None:
        options["zigzag"] = parse_pairs(zigzag, "--zigzag")
    return sampler, ts, options, spec.nfe(ts, **options)


def _prepare_out(out: Path, seeds: list[int], overwrite: bool, resume: bool) -> None:
    parts = out.with_name(out.name + ".parts")
    if overwrite:
        if out.suffix == ".npz":
            remove_output(out)
            remove_output(parts)
        elif out.is_dir():
            for s in seeds:  # only the files this run would write: never a whole folder
                (out / f"{s:06d}.png").unlink(missing_ok=True)
        else:
            remove_output(out)
        return
    if resume:
        return
    if out.exists():
        raise CliError(f"{out} exists; pass --overwrite to replace it (or --resume to continue an interrupted run)")
    if parts.exists():
        raise CliError(f"{parts} holds a partial run; pass --resume to continue it or --overwrite to start over")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--nfe", type=click.IntRange(1, 1000), default=None, show_default="1", help="Network evaluations.")
@click.option("--sigmas", default=None, help="Explicit σ list, e.g. 80,0.8 (overrides --nfe).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="auto", show_default=True, help="See above.")
@click.option("--zigzag", default=None, help="BCM zigzag rounds SIGMA_NOISE:SIGMA_UP[,…], e.g. 0.12:0.4.")
@click.option(
    "--heun-steps", type=click.IntRange(2, 1000), default=None, show_default="18", help="EDM time steps (heun only)."
)
@renamed_option("--steps", "--heun-steps", "heun_steps", type=click.IntRange(2, 1000))
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of images (seeds 0..N-1).")
@click.option("--seeds", default=None, help="Seeds instead of --num, e.g. 0-49999 or 0,5,10-19.")
@click.option("--out", required=True, type=click.Path(), help="Folder of PNGs, or FILE.npz (arr_0 uint8 NHWC).")
@batch_option(64)
@class_label_option
@network_option
@device_option
@overwrite_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --out.")
def sample(checkpoint, nfe, sigmas, sampler, zigzag, heun_steps, num, seeds, out, batch_size, class_label, network,
           device, overwrite, resume):  # fmt: skip
    """Generate one image per seed with CHECKPOINT (a run folder or a checkpoints/step-* folder).

    \b
    Samplers (auto picks by the checkpoint's kind):
      consistency  onestep: [σ_max]; multistep: --nfe k>1 takes the recipe's σ list
                   when it has k points (model.sample_sigmas; ECT: 80, 0.821), else k
                   points of the Karras grid (ρ=7) from σ_max down, σ_min excluded
                   (k=2: 80, 2.52); it re-noises as model.sample_renoise says (cm:
                   √(σ²−σ_min²)·ε, ect: σ·ε)
      bcm          bcm-ancestral: --nfe k jumps along the Karras grid σ_max → σ_min;
                   bcm-zigzag: one jump σ_max → σ_min, then --zigzag rounds
                   (default 0.1:1.2, 3 NFE); bcm-mixture: 80 → 3.0 → σ_min, then
                   --zigzag rounds (default 0.12:0.4, 4 NFE). A round (σ_n, σ_u) adds
                   σ_n noise, jumps up to σ_u and back down to σ_min.
      diffusion    heun: EDM's sampler with --heun-steps k time steps (NFE 2k−1).
    --sigmas replaces the σ list (the BCM chain includes its end σ). Image i depends only
    on seed i; conditional models draw a label per seed unless --class-label.

    \b
    Example:
      cm sample runs/digits-ict --nfe 2 --num 1000 --out samples.npz
    """
    import cm_eval

    if (num is None) == (seeds is None):
        raise click.UsageError("give exactly one of --num N and --seeds LIST")
    if overwrite and resume:
        raise click.UsageError("--overwrite and --resume exclude each other")
    seed_list = cm_eval.parse_seeds(num if num is not None else seeds)
    sigma_list = parse_floats(sigmas, "--sigmas")
    out = Path(out)
    _prepare_out(out, seed_list, overwrite, resume)
    check_device(device)
    model = load_model(checkpoint, network, device)
    name, ts, options, nfe_used = plan(model, sampler, nfe, sigma_list, heun_steps, zigzag)
    if class_label is not None and not model.num_classes:
        raise click.UsageError(f"--class-label: {model.checkpoint} is unconditional")
    existed = {p: p.exists() for p in (out, out.with_name(out.name + ".parts"))}
    try:
        result = cm_eval.generate(
            model.function,
            out,
            seeds=seed_list,
            shape=model.sample_shape,
            sigmas=ts,
            sampler=name,
            batch_size=batch_size,
            num_classes=model.num_classes or None,
            class_label=class_label,
            device=device,
            progress=progress("sampling"),
            **options,
        )
    except BaseException:
        # A run that failed before writing anything leaves no empty folder behind to trip the next one.
        for path, was_there in existed.items():
            if not was_there and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    click.echo(
        f"{result['written']} images written ({result['skipped']} already there) to {result['path']}; "
        f"{model.describe()}; NFE {nfe_used}, sigmas {[round(s, 4) for s in ts]}"
    )


COMMANDS = [sample]
