"""``cm train``: run cm_train on a config file, single process or under a launcher."""

from __future__ import annotations

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.pass_context
def train(ctx: click.Context, config: str, overrides: tuple[str, ...]) -> None:
    """Train a model as CONFIG (.toml/.json/.yaml) says, with KEY=VALUE overrides.

    CPU threads: `cm --threads N train ...` or run.threads=N; by default the cores not kept busy by
    other processes (the log says how many and why; 1 thread repeats results bit-for-bit).

    Runs unchanged on one process or under `mpiexec -n 8`, `srun` or `torchrun --nproc_per_node 8`
    (cm_train reads the launcher's environment). A run folder that already holds checkpoints is
    resumed (run.resume=true). A bad key or value exits with status 1 naming the key.

    \b
    Example:
      cm train packages/cm-train/configs/digits.toml run.total_steps=2000 run.dir=runs/digits
    """
    import cm_train

    from ..metrics import METRICS

    for item in overrides:
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. run.total_steps=2000)", param_hint="OVERRIDES")
    threads = (ctx.obj or {}).get("threads")
    if threads and not any(item.startswith("run.threads=") for item in overrides):
        overrides = (*overrides, f"run.threads={threads}")
    cfg = cm_train.load_config(config, list(overrides))
    result = cm_train.run(cfg, metrics=METRICS)
    last = result.get("metrics") or {}
    loss = last.get("loss")
    loss_text = f", loss {loss:.4g}" if isinstance(loss, float) else ""
    click.echo(f"trained to step {result.get('step')}{loss_text}; checkpoint {result.get('checkpoint')}")


COMMANDS = [train]
