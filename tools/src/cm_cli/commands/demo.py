"""``cm demo``: the end-to-end digits demo (cm_cli.demo: train with cm-train, sample and score with cm-eval, report)."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", default="demo-out", show_default=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--quick", is_flag=True, help="A shorter run (a smoke test, not the documented numbers).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--threads",
    "demo_threads",
    type=click.IntRange(min=0),
    default=1,
    help="CPU threads; 1 repeats every number bit-for-bit (2 run ~20% faster, not bit-for-bit); 0: torch's choice.",
)
def demo(out: str, quick: bool, overwrite: bool, demo_threads: int) -> None:
    """Train small consistency models on the embedded digits and write a report.

    \b
    Example:
      cm demo --out demo-out --quick
    """
    from pathlib import Path

    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    from ..demo import run_demo

    result = run_demo(
        out, quick=quick, overwrite=overwrite, threads=demo_threads or None, log=lambda m: click.echo(m, err=True)
    )
    click.echo(result["text"])
    click.echo(f"report: {result['report']}")


COMMANDS = [demo]
