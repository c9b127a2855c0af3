"""The ``cm`` command group: global options and the one place where errors become exit codes.

Exit codes: 0 success; 1 a failure (missing or wrong checkpoint, bad file contents, a library's
ValueError / FileNotFoundError / ConfigError); 2 a usage error (bad option, value out of range);
75 `cm train` stopped by SIGINT/SIGTERM/SIGUSR1 after committing a checkpoint (run the same
command again to resume); 130 interrupted, nothing kept (Ctrl-C, or twice during training).
Every error is one line on stderr, ``error: …``; ``cm --debug …`` re-raises with the traceback.
"""

from __future__ import annotations

import sys
import warnings

import click

from . import __version__
from .commands import bench, convert, demo, edit, evaluate, info, invert, sample, stats, t2i, train

# Exceptions the libraries raise for bad inputs: their message is the whole story.
_EXPECTED = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    ImportError,
    KeyError,
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # the system's reason, with the file when it is not in it
        named = exc.filename is not None and str(exc.filename) not in exc.strerror
        return _one_line(f"{exc.filename}: {exc.strerror}" if named else exc.strerror)
    text = _one_line(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if isinstance(exc, _EXPECTED) and text:
        return text
    return f"{type(exc).__name__}: {text or 'no message'} (rerun as `cm --debug …` for the traceback)"


class CmGroup(click.Group):
    """A click group whose errors are one ``error: …`` line and an exit code (see the module doc)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            code = getattr(exc, "exit_code", None)  # cm_train.Interrupted: 75, checkpoint committed
            if type(exc).__name__ == "Interrupted" and isinstance(code, int):
                raise _Failure(_one_line(exc), code) from exc
            raise _Failure(_message(exc)) from exc

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            click.echo(f"error: {_one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:  # Ctrl-C outside training, or twice during `cm train`
            click.echo("error: interrupted (nothing of the interrupted work was kept)", err=True)
            sys.exit(130)
        # Non-standalone click returns the status of an Exit (--help, ctx.exit(n)); commands return None.
        sys.exit(code if isinstance(code, int) else 0)


class _Failure(click.ClickException):
    exit_code = 1

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@click.group(cls=CmGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch; default: torch's choice, and for `cm train` the free cores (run.threads).",
)
@click.version_option(__version__, prog_name="cm")
@click.pass_context
def cli(ctx: click.Context, debug: bool, threads: int | None) -> None:
    """Train, sample, edit, invert, evaluate and benchmark consistency models.

    \b
    Example:
      cm sample runs/digits-ict --nfe 2 --num 64 --out samples.npz
    """
    ctx.obj = {"debug": debug, "threads": threads}
    if not debug:  # a library warning is one `warning: …` line, like the errors (no source line)
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {_one_line(message)}\n"
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


for _module in (train, sample, edit, invert, evaluate, stats, bench, info, convert, demo, t2i):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    cli(prog_name="cm")
