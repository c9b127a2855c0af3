"""``cm convert``: openai / EDM checkpoints to cm_nets safetensors (no pickled code runs)."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import check_out, overwrite_option


@click.command()
@click.argument("kind", type=click.Choice(["openai", "edm"]))
@click.argument("src", type=click.Path())
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="DST.safetensors (+ DST.json).")
@click.option(
    "--preset",
    default=None,
    help="cm_nets preset. openai: guessed from the keys if omitted. edm: read from the snapshot; "
    "if given, it must match (a check).",
)
@click.option("--key", default="ema", show_default=True, help="EDM pickle entry holding the network.")
@overwrite_option
def convert(kind: str, src: str, out: str, preset: str | None, key: str, overwrite: bool) -> None:
    """Convert an openai/iCT/BCM (.pt) or EDM/ECT (.pkl) checkpoint to cm_nets safetensors.

    EDM / ECT snapshots (network-snapshot-*.pkl written by their training loops, or the
    published edm-*.pkl) are read without running the code they carry; the architecture
    (DDPM++ or NCSN++, augment_dim, label_dim, resolution, widths, ...) comes from the
    constructor arguments EDM recorded in the snapshot, and is printed.

    \b
    Examples:
      cm convert openai cd_imagenet64_l2.pt --out cd-imagenet64.safetensors
      cm convert edm edm-cifar10-32x32-uncond-vp.pkl --out checkpoints/edm-cifar10-uncond-vp.safetensors
    """
    import cm_nets

    out = Path(out)
    if out.suffix != ".safetensors":
        raise click.BadParameter(f"{out} must end in .safetensors", param_hint="--out")
    check_out(out, overwrite)
    check_out(out.with_suffix(".json"), overwrite)
    if not Path(src).is_file():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    if kind == "openai":
        module = cm_nets.from_openai(src, preset=preset)
    else:
        snapshot = cm_nets.read_edm_snapshot(src, key=key)
        click.echo(f"{src} [{key!r}]: {snapshot.describe()}")
        module = cm_nets.from_edm(snapshot, preset)
        config = module.cm_nets_config
        click.echo(f"cm_nets preset {config['preset']} with overrides {config['overrides'] or 'none'}")
        if snapshot.model_kwargs.get("augment_dim"):
            click.echo(
                f"note: augment_dim {snapshot.model_kwargs['augment_dim']} is EDM's augmentation conditioning; "
                "sampling passes no augment labels (as EDM's generate.py), and a model without it "
                "(ECT: augment_dim 0) starts from these weights minus map_augment.weight"
            )
        if snapshot.precond == "ECMPrecond":
            click.echo(
                f"note: an ECT network samples with the shifted boundary f(x, {snapshot.sigma_min:g}) = x: "
                f'set model.sample_boundary = "shifted" and model.sample_sigma_min = {snapshot.sigma_min:g}'
            )
    cm_nets.save(module, out)  # each of the two files through a temporary one beside it (fsync, rename)
    n = sum(p.numel() for p in module.parameters())
    click.echo(f"wrote {out} and {out.with_suffix('.json')}: {type(module).__name__}, {n / 1e6:.2f}M parameters")


COMMANDS = [convert]
