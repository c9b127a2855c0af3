"""``cm sample``: images from a checkpoint, one per seed, into a PNG folder or an .npz."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import (
    CliError,
    batch_option,
    check_device,
    class_label_option,
    device_option,
    load_model,
    network_option,
    overwrite_option,
    parse_floats,
    parse_pairs,
    progress,
    remove_output,
)

SAMPLERS = ("auto", "onestep", "multistep", "bcm-ancestral", "bcm-zigzag", "bcm-mixture", "heun")
BCM_ZIGZAG_DEFAULT = "0.1:1.2"  # BCM's 3-NFE zigzag recipe: one jump σ_max → σ_min, then (0.1, 1.2)
BCM_MIXTURE_DEFAULT = "0.12:0.4"  # BCM's 4-NFE mixture recipe: 80 → 3.0 → 0.002, then (0.12, 0.4)
BCM_MIXTURE_MIDDLE = 3.0


def default_sigmas(model, nfe: int, recipe: bool = True) -> list[float]:
    """Consistency sampling: the recipe's σ list when it has k = nfe points (model.sample_sigmas,
    e.g. ECT's 80, 0.821), else k points of the Karras grid (ρ = 7) from σ_max down, σ_min excluded."""
    import cm_core

    if recipe and len(model.sample_sigmas) == nfe:
        return list(model.sample_sigmas)
    if nfe == 1:
        return [model.sigma_max]
    grid = cm_core.karras_sigmas(nfe + 1, model.sigma_min, model.sigma_max).flip(0).tolist()
    return grid[:-1]


def chain_sigmas(model, jumps: int) -> list[float]:
    """BCM ancestral chain: the Karras grid of jumps+1 points from σ_max down to σ_min included."""
    import cm_core

    if jumps == 1:
        return [model.sigma_max, model.sigma_min]
    return cm_core.karras_sigmas(jumps + 1, model.sigma_min, model.sigma_max).flip(0).tolist()


def heun_sampler(f, z, sigmas, noise, **cond):
    """EDM's deterministic Heun sampler as a cm_eval sampler; sigmas end at 0 (cm_core.solve allows it)."""
    import cm_core

    return cm_core.solve(f, sigmas[0] * z, sigmas, method="heun", **cond)


def plan(model, sampler: str, nfe: int, nfe_given: bool, sigmas, steps: int, zigzag) -> tuple:
    """(cm_eval sampler, σ list, sampler options, NFE) for this checkpoint and these options."""
    import cm_core

    kind = cm_core.function_kind(model.kind)  # which samplers fit is declared with the function kind
    if sampler == "auto":
        sampler = kind.default_sampler
        one_sigma = nfe == 1 and sigmas is None or sigmas is not None and len(sigmas) == 1
        if sampler == "multistep" and one_sigma:
            sampler = "onestep"
    if sampler not in kind.samplers:
        raise CliError(
            f"sampler {sampler!r} does not fit {model.checkpoint}: it is a {model.kind} model "
            f"(objective {model.objective!r}); use --sampler {' or '.join(kind.samplers)}"
        )
    if sampler not in SAMPLERS:
        raise CliError(f"{model.kind} models sample with {sampler!r}, which this version of cm does not run")
    if zigzag is not None and sampler not in ("bcm-zigzag", "bcm-mixture"):
        raise click.UsageError("--zigzag applies to --sampler bcm-zigzag and bcm-mixture only")
    if sampler == "heun":
        if nfe_given or sigmas is not None:
            raise click.UsageError("--sampler heun takes --steps (EDM's time steps), not --nfe or --sigmas")
        ts = cm_core.edm_sampling_sigmas(steps, model.sigma_min, model.sigma_max).tolist()
        return heun_sampler, ts, {}, 2 * steps - 1
    if sampler in ("onestep", "multistep"):
        ts = sigmas if sigmas is not None else default_sigmas(model, nfe)
        if sampler == "onestep" and len(ts) != 1:
            raise click.UsageError(f"--sampler onestep takes one σ; got {len(ts)} (use multistep)")
        options = {} if sampler == "onestep" else {"sigma_min": model.sigma_min, "renoise": model.renoise}
        return sampler, ts, options, len(ts)
    if sampler == "bcm-ancestral":
        ts = sigmas if sigmas is not None else chain_sigmas(model, nfe)
        return "bcm", ts, {}, len(ts) - 1
    # bcm-zigzag / bcm-mixture: NFE = jumps of the chain + 2 per zigzag round.
    if nfe_given:
        raise click.UsageError(
            f"--nfe does not apply to {sampler}: set its chain with --sigmas and its rounds with --zigzag"
        )
    if sampler == "bcm-zigzag":
        ts = sigmas if sigmas is not None else [model.sigma_max, model.sigma_min]
        pairs = parse_pairs(zigzag or BCM_ZIGZAG_DEFAULT, "--zigzag")
    else:
        ts = sigmas if sigmas is not None else [model.sigma_max, BCM_MIXTURE_MIDDLE, model.sigma_min]
        pairs = parse_pairs(zigzag or BCM_MIXTURE_DEFAULT, "--zigzag")
    return "bcm", ts, {"zigzag": pairs}, len(ts) - 1 + 2 * len(pairs)


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
@click.option("--nfe", type=click.IntRange(1, 1000), default=1, show_default=True, help="Network evaluations.")
@click.option("--sigmas", default=None, help="Explicit σ list, e.g. 80,0.8 (overrides --nfe).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="auto", show_default=True, help="See above.")
@click.option("--zigzag", default=None, help="BCM zigzag rounds SIGMA_NOISE:SIGMA_UP[,…], e.g. 0.12:0.4.")
@click.option(
    "--steps", type=click.IntRange(2, 1000), default=18, show_default=True, help="EDM time steps (heun only)."
)
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of images (seeds 0..N-1).")
@click.option("--seeds", default=None, help="Seeds instead of --num, e.g. 0-49999 or 0,5,10-19.")
@click.option("--out", required=True, type=click.Path(), help="Folder of PNGs, or FILE.npz (arr_0 uint8 NHWC).")
@batch_option(64)
@class_label_option
@network_option
@device_option
@overwrite_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same --out.")
@click.pass_context
def sample(ctx, checkpoint, nfe, sigmas, sampler, zigzag, steps, num, seeds, out, batch_size, class_label, network,
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
      diffusion    heun: EDM's sampler with --steps time steps (NFE 2·steps−1).
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
    nfe_given = ctx.get_parameter_source("nfe") != click.core.ParameterSource.DEFAULT
    out = Path(out)
    _prepare_out(out, seed_list, overwrite, resume)
    check_device(device)
    model = load_model(checkpoint, network, device)
    fn, ts, options, nfe_used = plan(model, sampler, nfe, nfe_given, sigma_list, steps, zigzag)
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
            sampler=fn,
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
