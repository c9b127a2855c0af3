"""``cm bench``: run the benchmark scripts of a source checkout (tools/bench/*.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from .._common import CliError

SCRIPTS = {"kernels": "kernels.py", "nets": "nets.py", "step": "train_step.py", "eval": "eval.py", "gpu": "gpu.py"}


def bench_dir() -> Path:
    import cm_cli

    return Path(cm_cli.__file__).resolve().parents[2] / "bench"


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name", type=click.Choice(sorted(SCRIPTS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(name: str, args: tuple[str, ...]) -> None:
    """Run a benchmark (kernels, nets, step, eval, gpu); ARGS go to the script (`cm bench NAME --help`).

    `cm bench gpu` is the measuring part of tools/gpu_check.sh (which also installs, builds the
    CUDA kernels and runs the cuda tests).

    \b
    Example:
      cm bench kernels --quick
      cm bench gpu --device cpu --tiny
    """
    script = bench_dir() / SCRIPTS[name]
    if not script.is_file():
        raise CliError(f"cm bench needs a source checkout of the cm repository ({script} is missing)")
    rc = subprocess.call([sys.executable, str(script), *args])
    if rc:
        raise click.exceptions.Exit(rc)


COMMANDS = [bench]
