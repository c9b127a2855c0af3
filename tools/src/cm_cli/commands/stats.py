"""``cm stats ref``: reference feature statistics (mu, sigma) of a dataset, for FID-style metrics."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import batch_option, check_out, device_option, overwrite_option, progress

# name -> (feature key, input range the extractor expects)
FEATURES = {"inception": ("pool", (0.0, 1.0)), "dino": ("features", (0.0, 1.0)), "digits": ("features", (-1.0, 1.0))}


def _extractor(name: str, weights):
    import cm_eval

    from .evaluate import DINO_WHERE, INCEPTION_WHERE, _weights

    if name == "digits":
        return cm_eval.load_digits_classifier(weights)
    if weights is None:
        raise click.UsageError(f"--features {name} needs --weights PATH (nothing is downloaded)")
    if name == "inception":
        return cm_eval.inception_fid(_weights(weights, "Inception", INCEPTION_WHERE))
    return cm_eval.dinov2(_weights(weights, "DINOv2", DINO_WHERE))


def _dataset_batches(dataset: str, batch_size: int):
    """(number of images, iterable of float [B, C, H, W] batches in [-1, 1]) for DATASET."""
    import torch

    if dataset == "digits":
        import cm_eval

        x, _ = cm_eval.load_digits_data("all")
        return len(x), [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
    import cm_train
    from cm_train.config import DataConfig

    path = Path(dataset)
    if path.is_dir():
        source = "folder"
    elif path.suffix.lower() in (".zip", ".npz"):
        source = path.suffix.lower()[1:]
    elif not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist: give a folder, a .zip, an .npz or `digits`")
    else:
        raise ValueError(f"{path}: expected an image folder, a .zip, an .npz or `digits`")
    ds = cm_train.build_dataset(DataConfig(source=source, path=str(path)))
    if len(ds) == 0:
        raise ValueError(f"{path} holds no images")
    n = len(ds)
    return n, (ds.get(torch.arange(i, min(i + batch_size, n)))[0] for i in range(0, n, batch_size))


@click.group()
def stats() -> None:
    """Feature statistics files.

    \b
    Example:
      cm stats ref digits --features digits --out digits-refs.npz
    """


@stats.command()
@click.argument("dataset")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics .npz (mu, sigma) to write.")
@click.option("--features", type=click.Choice(sorted(FEATURES)), required=True, help="Feature extractor.")
@click.option(
    "--weights", type=click.Path(), default=None, help="Extractor weights (inception, dino; digits ships its own)."
)
@batch_option(64)
@device_option
@overwrite_option
def ref(dataset, out, features, weights, batch_size, device, overwrite):
    """Mean and covariance of DATASET's features: an image folder, a .zip, an .npz or `digits`.

    The file has `mu` and `sigma` (EDM fid-refs / pytorch-fid layout) and is read by
    `cm eval fid --ref` and `cm eval fd-dino --ref`.

    \b
    Example:
      cm stats ref data/cifar10.zip --features inception --weights pt_inception.pth --out cifar10-refs.npz
    """
    import cm_eval

    from .._common import check_device

    out = check_out(out, overwrite)
    net = _extractor(features, weights).to(check_device(device))
    n, chunks = _dataset_batches(dataset, batch_size)
    key, value_range = FEATURES[features]
    wrapped = progress(f"{features} features")(chunks)
    s = cm_eval.compute_stats(net, wrapped, key=key, value_range=value_range, device=device)
    cm_eval.save_stats(out, s.mean(), s.cov(), features=features, num_images=n)
    click.echo(f"wrote {out}: {features} statistics of {n} images ({s.mean().shape[0]}-d)")


COMMANDS = [stats]
