"""``python -m cm_train --config FILE [section.key=value ...]`` — the trainer without the CLI package."""

from __future__ import annotations

import argparse

import sys

from . import ConfigError, Interrupted, load_config, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cm_train", description=__doc__)
    parser.add_argument("--config", required=True, help="TOML/YAML/JSON config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.total_steps=2000 optim.lr=2e-4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        run(cfg)
    except Interrupted as exc:  # SIGINT/SIGTERM/SIGUSR1: checkpoint committed; rerun to resume
        print(f"cm-train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
