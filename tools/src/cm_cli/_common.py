"""Helpers shared by the commands: errors, options, output paths, progress bars, loading inputs."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import zipfile
import zlib
from pathlib import Path

import click
import numpy as np

NAMED_MASKS = ("left", "right", "top", "bottom", "center")


class CliError(click.ClickException):
    """A failure that is not a usage error (missing file, wrong checkpoint kind): exit 1."""

    exit_code = 1


# --- options -------------------------------------------------------------------------------------


def network_option(f):
    return click.option(
        "--network",
        default="ema",
        show_default=True,
        metavar="ema|net|target|ema-NAME",
        help="Which weights of the checkpoint: the first EMA, the online network, the target or a named EMA.",
    )(f)


def device_option(f):
    return click.option(
        "--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to run."
    )(f)


def overwrite_option(f):
    return click.option("--overwrite", is_flag=True, help="Replace output files (--out, --json) that exist.")(f)


def json_option(f):
    return click.option(
        "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the numbers to FILE."
    )(f)


def batch_option(default: int = 64):
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help="Images per batch."
    )


def class_label_option(f):
    return click.option(
        "--class-label",
        type=click.IntRange(min=0),
        default=None,
        help="Class of every image (class-conditional models).",
    )(f)


def renamed_option(old: str, new: str, param: str, **option_kw):
    """Accept ``old`` (hidden, deprecated) as a spelling of the option ``new``, whose value is the
    parameter ``param``. Old spellings live one release (``--steps`` meant Heun steps, σ counts, path
    points and inversion jumps in four commands); ``option_kw``: the new option's type, so both check alike."""

    def decorator(f):
        @functools.wraps(f)
        def command(*args, **kwargs):
            value = kwargs.pop(f"old_{param}")
            if value is not None:
                if click.get_current_context().get_parameter_source(param) != click.core.ParameterSource.DEFAULT:
                    raise click.UsageError(f"{old} is the old spelling of {new}; give {new} only")
                click.echo(f"warning: {old} is deprecated here and will be removed; use {new}", err=True)
                kwargs[param] = value
            return f(*args, **kwargs)

        return click.option(old, f"old_{param}", default=None, hidden=True, **option_kw)(command)

    return decorator


def parse_floats(text: str | None, name: str) -> list[float] | None:
    """'80,0.8' → [80.0, 0.8]; None stays None. A bad list is a usage error."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers, e.g. 80,0.8", param_hint=name
        ) from None
    if not values:
        raise click.BadParameter("give at least one number", param_hint=name)
    return values


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,2,4", param_hint=name
        ) from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give positive integers, e.g. 1,2,4", param_hint=name)
    return values


def parse_pairs(text: str, name: str) -> list[tuple[float, float]]:
    """'0.12:0.4,0.1:1.2' → [(0.12, 0.4), (0.1, 1.2)]."""
    pairs = []
    for part in text.split(","):
        try:
            a, b = part.split(":")
            pairs.append((float(a), float(b)))
        except ValueError:
            raise click.BadParameter(
                f"{part!r} is not a pair SIGMA_NOISE:SIGMA_UP; use e.g. 0.12:0.4 or 0.12:0.4,0.1:1.2", param_hint=name
            ) from None
    return pairs


# --- devices and threads -------------------------------------------------------------------------


def check_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was given but torch sees no CUDA GPU here; use --device cpu")
    return device


# --- outputs -------------------------------------------------------------------------------------


def check_out(path, overwrite: bool) -> Path:
    """Refuse an existing output unless --overwrite; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot write {path}: cannot create {path.parent} ({exc.strerror}); choose another path") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {path}: {path.parent} is not writable; choose another path")
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Temporary file in the same folder, fsync, os.replace (``cm_nets.files``): never half a file."""
    from cm_nets.files import atomic_write_bytes as write

    return write(path, data)


def atomic_save_npz(path, **arrays) -> Path:
    from cm_nets.files import atomic_save_npz as save

    return save(path, **arrays)


def write_json(path, obj, overwrite: bool = True) -> Path:
    """The JSON of a result (through cm_eval.write_report: atomic, NaN/inf as strings)."""
    import cm_eval

    path = check_out(path, overwrite)
    return cm_eval.write_report(path, obj)


def remove_output(path: Path) -> None:
    """Remove a file output (or a tree of one that we made, e.g. an .npz's .parts folder)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- progress ------------------------------------------------------------------------------------


def progress(desc: str, unit: str = "batch"):
    """A callable wrapping an iterable in a tqdm bar on stderr (hidden when stderr is not a TTY)."""
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


def batches(x, batch_size: int, desc: str):
    """Slices of ``x`` (array or tensor), with a progress bar."""
    chunks = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    return progress(desc)(chunks)


# --- inputs --------------------------------------------------------------------------------------


def load_model(checkpoint, network: str = "ema", device: str = "cpu"):
    import cm_train

    return cm_train.load_trained(checkpoint, network=network, device=check_device(device))


def default_sigmas(model, sampler: str, n: int | None = None, *, recipe: bool = True) -> list[float]:
    """cm_core's default σ list of ``sampler`` (n of its count: NFE, Heun steps) on the checkpoint's
    σ_min … σ_max; ``recipe``: the consistency samplers take its model.sample_sigmas when they have n points."""
    import cm_core

    return cm_core.get_sampler(sampler).default_sigmas(
        n, sigma_min=model.sigma_min, sigma_max=model.sigma_max, recipe=model.sample_sigmas if recipe else ()
    )


def load_uint8(spec: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Images as uint8 NHWC plus labels (an .npz's arr_1) or None, from a PNG, a folder of PNGs or an .npz."""
    import cm_eval

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a PNG file, a folder of PNGs or an .npz (arr_0)")
    labels = None
    if path.is_dir():
        images = cm_eval.load_image_folder(path, limit)
    elif path.suffix.lower() == ".png":
        images = cm_eval.load_png(path)[None]
    elif path.suffix.lower() == ".npz":
        try:
            images = cm_eval.load_reference_batch(path)
            with np.load(path) as f:
                if "arr_1" in f.files:
                    labels = np.asarray(f["arr_1"]).astype(np.int64).reshape(-1)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as exc:
            raise ValueError(f"{path}: not a readable .npz ({exc or type(exc).__name__}); re-create it") from None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{path}: arr_1 holds {len(labels)} labels for {len(images)} images")
    else:
        raise ValueError(f"{path}: expected a .png file, a folder of .png files or an .npz with arr_0")
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    return images, labels


def load_images(spec: str, limit: int | None = None):
    """Float images [N, C, H, W] in [-1, 1] and labels (tensor or None); ``digits`` = held-out test digits."""
    import cm_eval
    import torch

    if spec == "digits":
        x, labels = cm_eval.load_digits_data("test")
        if limit is not None:
            x, labels = x[:limit], labels[:limit]
        return x, labels
    images, labels = load_uint8(spec, limit)
    return cm_eval.to_float(images), None if labels is None else torch.from_numpy(labels)


def check_shape(x, model, what: str) -> None:
    shape, want = tuple(x.shape[1:]), tuple(model.sample_shape)
    if shape != want:
        raise ValueError(
            f"{what} are {'×'.join(map(str, shape))} (C×H×W) but {model.checkpoint} makes "
            f"{'×'.join(map(str, want))} images; resize or convert them first"
        )


def labels_for(model, n: int, class_label: int | None, labels=None):
    """Class labels for a conditional model: --class-label, else the inputs' own; None when unconditional."""
    import torch

    if not model.num_classes:
        if class_label is not None:
            raise click.UsageError(f"--class-label: {model.checkpoint} is unconditional")
        return None
    if class_label is not None:
        if class_label >= model.num_classes:
            raise click.BadParameter(
                f"{class_label} is not a class of this model (0..{model.num_classes - 1})", param_hint="--class-label"
            )
        return torch.full((n,), class_label, dtype=torch.long)
    if labels is None:
        raise click.UsageError(
            f"{model.checkpoint} is class-conditional ({model.num_classes} classes): pass --class-label C "
            "(or input images that carry labels: `digits`, or an .npz with arr_1)"
        )
    return torch.as_tensor(labels, dtype=torch.long)


def echo_json(result: dict, json_path, overwrite: bool) -> None:
    if json_path:
        write_json(json_path, result, overwrite)
        click.echo(f"wrote {json_path}")


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
