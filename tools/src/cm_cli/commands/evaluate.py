"""``cm eval``: sample-quality and model metrics (FID, FD-DINOv2, precision/recall, IS, digits, inversion,
ODE solving error, NFE sweeps) and fixed initial-noise files (make-noise). Nothing is downloaded:
feature-extractor weights come from paths given."""

from __future__ import annotations

from pathlib import Path

import click

from .._common import (
    CliError,
    batch_option,
    batches,
    check_out,
    class_label_option,
    default_sigmas,
    device_option,
    echo_json,
    json_option,
    load_model,
    load_uint8,
    network_option,
    overwrite_option,
    parse_ints,
    progress,
    renamed_option,
    write_json,
)
from .invert import inversion_result, need_bcm, reconstruct_options, report_line

INCEPTION_WHERE = (
    "pass the path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
    "(github.com/mseitzer/pytorch-fid releases; see the cm-eval README)"
)
DINO_WHERE = (
    "pass Meta's dinov2_vitl14_pretrain.pth or a timm vit_large_patch14_dinov2 state dict (see the cm-eval README)"
)


def _weights(path, what: str, where: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights not found at {path}; {where}")
    return path


def _inception(path):
    import cm_eval

    return cm_eval.inception_fid(_weights(path, "Inception", INCEPTION_WHERE))


def _features(net, images, key: str, batch_size: int, desc: str):
    import cm_eval
    import torch

    feats = cm_eval.extract(net, batches(images, batch_size, desc), key=key, value_range=(0.0, 1.0))
    return torch.cat(list(feats))


def _stats(net, images, key: str, batch_size: int, desc: str):
    import cm_eval

    s = cm_eval.compute_stats(net, batches(images, batch_size, desc), key=key, value_range=(0.0, 1.0))
    return s.mean(), s.cov()


def _reference(ref, net, key: str, batch_size: int) -> dict:
    """{"mu", "sigma"} from a statistics .npz, or computed from a reference image batch (arr_0)."""
    import cm_eval
    import numpy as np

    ref = Path(ref)
    if not ref.is_file():
        raise FileNotFoundError(f"reference {ref} does not exist; make one with `cm stats ref DATASET --out {ref}`")
    with np.load(ref) as f:
        has_stats = {"mu", "sigma"} <= set(f.files)
    if has_stats:
        return cm_eval.load_stats(ref)
    mu, sigma = _stats(net, cm_eval.load_reference_batch(ref), key, batch_size, "reference features")
    return {"mu": mu, "sigma": sigma}


def _frechet(net, key: str, samples, ref, batch_size: int, desc: str) -> tuple[float, int]:
    """Fréchet distance of SAMPLES' ``key`` features to the reference, and the number of samples."""
    import cm_eval

    images, _ = load_uint8(samples)
    mu, sigma = _stats(net, images, key, batch_size, desc)
    r = _reference(ref, net, key, batch_size)
    return cm_eval.frechet_distance(mu, sigma, r["mu"], r["sigma"]), len(images)


def _finish(line: str, result: dict, json_path, overwrite: bool) -> None:
    if json_path:  # written before anything is printed: a failed write never follows printed results
        write_json(json_path, result, overwrite)
    click.echo(line)
    if json_path:
        click.echo(f"wrote {json_path}")


def _precheck(json_path, overwrite):
    if json_path:
        check_out(json_path, overwrite)


@click.group("eval")
def evaluate() -> None:
    """Metrics of samples and models; each prints one line and can write --json.

    \b
    Example:
      cm eval digits samples.npz
    """


@evaluate.command()
@click.argument("samples", type=click.Path())
@click.option("--ref", required=True, type=click.Path(), help="Reference statistics (mu/sigma) or images (arr_0) .npz.")
@click.option("--inception", required=True, type=click.Path(), help="FID Inception-v3 weights (pytorch-fid .pth).")
@batch_option(64)
@json_option
@overwrite_option
def fid(samples, ref, inception, batch_size, json_path, overwrite):
    """FID of SAMPLES against a reference.

    SAMPLES: a folder of PNGs or an .npz (arr_0 uint8 NHWC, optional arr_1 labels).

    \b
    Example:
      cm eval fid samples.npz --ref cifar10-32x32.npz --inception pt_inception-2015-12-05-6726825d.pth
    """

    _precheck(json_path, overwrite)
    value, n = _frechet(_inception(inception), "pool", samples, ref, batch_size, "inception features")
    _finish(f"FID {value:.4f} ({n} images)", {"fid": value, "num_images": n}, json_path, overwrite)


@evaluate.command("fd-dino")
@click.argument("samples", type=click.Path())
@click.option("--ref", required=True, type=click.Path(), help="Reference statistics (mu/sigma) or images (arr_0) .npz.")
@click.option("--dino", required=True, type=click.Path(), help="DINOv2 ViT-L/14 weights.")
@batch_option(32)
@json_option
@overwrite_option
def fd_dino(samples, ref, dino, batch_size, json_path, overwrite):
    """Fréchet distance in DINOv2 feature space (EDM2's FD_DINOv2).

    SAMPLES: a folder of PNGs or an .npz (arr_0 uint8 NHWC, optional arr_1 labels).

    \b
    Example:
      cm eval fd-dino samples.npz --ref refs-dino.npz --dino dinov2_vitl14_pretrain.pth
    """
    import cm_eval

    _precheck(json_path, overwrite)
    net = cm_eval.dinov2(_weights(dino, "DINOv2", DINO_WHERE))
    value, n = _frechet(net, "features", samples, ref, batch_size, "dinov2 features")
    _finish(f"FD_DINOv2 {value:.4f} ({n} images)", {"fd_dinov2": value, "num_images": n}, json_path, overwrite)


@evaluate.command("precision-recall")
@click.argument("samples", type=click.Path())
@click.option("--ref-images", required=True, type=click.Path(), help="Real images: PNG folder or .npz (arr_0).")
@click.option("--inception", required=True, type=click.Path(), help="FID Inception-v3 weights (pytorch-fid .pth).")
@click.option("--k", type=click.IntRange(min=1), default=3, show_default=True, help="k-th nearest neighbour radius.")
@batch_option(64)
@json_option
@overwrite_option
def precision_recall(samples, ref_images, inception, k, batch_size, json_path, overwrite):
    """Improved precision and recall (Kynkäänniemi et al. 2019) in Inception space.

    SAMPLES: a folder of PNGs or an .npz (arr_0 uint8 NHWC, optional arr_1 labels).

    \b
    Example:
      cm eval precision-recall samples.npz --ref-images refs.npz --inception pt_inception.pth
    """
    import cm_eval

    _precheck(json_path, overwrite)
    net = _inception(inception)
    fake, _ = load_uint8(samples)
    real, _ = load_uint8(ref_images)
    r = cm_eval.precision_recall(
        _features(net, real, "pool", batch_size, "real features"),
        _features(net, fake, "pool", batch_size, "sample features"),
        k=k,
    )
    _finish(f"precision {r['precision']:.4f}  recall {r['recall']:.4f}", dict(r), json_path, overwrite)


@evaluate.command("is")
@click.argument("samples", type=click.Path())
@click.option("--inception", required=True, type=click.Path(), help="FID Inception-v3 weights (pytorch-fid .pth).")
@click.option("--splits", type=click.IntRange(min=1), default=10, show_default=True, help="Splits for mean ± std.")
@batch_option(64)
@json_option
@overwrite_option
def inception_score(samples, inception, splits, batch_size, json_path, overwrite):
    """Inception Score of SAMPLES.

    SAMPLES: a folder of PNGs or an .npz (arr_0 uint8 NHWC, optional arr_1 labels).

    \b
    Example:
      cm eval is samples.npz --inception pt_inception-2015-12-05-6726825d.pth
    """
    import cm_eval

    _precheck(json_path, overwrite)
    net = _inception(inception)
    images, _ = load_uint8(samples)
    mean, std = cm_eval.inception_score(_features(net, images, "logits", batch_size, "inception logits"), splits)
    _finish(f"IS {mean:.4f} ± {std:.4f}", {"is_mean": mean, "is_std": std}, json_path, overwrite)


@evaluate.command()
@click.argument("samples", type=click.Path())
@json_option
@overwrite_option
def digits(samples, json_path, overwrite):
    """FD-digits (the shipped digits classifier's features) and, with arr_1 labels, class accuracy.

    SAMPLES: a folder of PNGs or an .npz (arr_0 uint8 NHWC, optional arr_1 labels).

    \b
    Example:
      cm eval digits samples.npz --json digits.json
    """
    import cm_eval

    _precheck(json_path, overwrite)
    images, labels = load_uint8(samples)
    r = {"fd_digits": cm_eval.fd_digits(images), "num_images": len(images)}
    line = f"FD-digits {r['fd_digits']:.4f} ({len(images)} images)"
    if labels is not None:
        r["class_accuracy"] = cm_eval.digits_class_accuracy(images, labels)
        line += f"  class accuracy {r['class_accuracy']:.4f}"
    _finish(line, r, json_path, overwrite)


@evaluate.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--input", "images", required=True, help="A PNG, a folder of PNGs, an .npz (arr_0) or `digits`.")
@reconstruct_options
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N images.")
@batch_option(64)
@class_label_option
@network_option
@device_option
@json_option
@overwrite_option
def inversion(checkpoint, images, sigmas, jumps, reconstruct, limit, batch_size, class_label, network, device,
              json_path, overwrite):  # fmt: skip
    """Inversion MSE and PSNR of a BCM checkpoint (invert, reconstruct, compare).

    \b
    Example:
      cm eval inversion runs/digits-bcm --input digits
    """
    _precheck(json_path, overwrite)
    model = load_model(checkpoint, network, device)
    need_bcm(model, "cm eval inversion")
    r = inversion_result(model, images, limit, class_label, device, jumps, sigmas, reconstruct, batch_size)
    _finish(report_line(r), r, json_path, overwrite)


@evaluate.command("ode-error")
@click.argument("checkpoint", type=click.Path())
@click.option("--teacher", required=True, type=click.Path(), help="The diffusion (teacher) checkpoint.")
@click.option("--num", type=click.IntRange(min=1), default=256, show_default=True, help="Images (seeds 0..N-1).")
@click.option("--nfe", type=click.IntRange(1, 1000), default=1, show_default=True, help="Student network evaluations.")
@click.option(
    "--teacher-points",
    type=click.IntRange(2, 10000),
    default=80,
    show_default=True,
    help="Points of the teacher's Karras grid σ_max → σ_min (Heun; NFE 2·(points−1)).",
)
@renamed_option("--teacher-steps", "--teacher-points", "teacher_points", type=click.IntRange(2, 10000))
@click.option("--cache", type=click.Path(dir_okay=False), default=None, help="Cache the teacher's solutions here.")
@batch_option(64)
@class_label_option
@network_option
@device_option
@json_option
@overwrite_option
def ode_error(checkpoint, teacher, num, nfe, teacher_points, cache, batch_size, class_label, network, device, json_path,
              overwrite):  # fmt: skip
    """ODE solving error (Direct CM): student samples vs the teacher's PF-ODE solution from the same noise.

    The student samples with --nfe network evaluations (as `cm sample`); the teacher solves with
    Heun on a Karras grid of --teacher-points points σ_max → σ_min. Conditional models: seed i gets class
    i mod num_classes unless --class-label.

    \b
    Example:
      cm eval ode-error runs/digits-ict --teacher runs/digits-edm --num 256 --nfe 2
    """
    import cm_eval
    import torch

    _precheck(json_path, overwrite)
    model = load_model(checkpoint, network, device)
    if model.kind == "diffusion":
        raise CliError(f"{model.checkpoint} is a diffusion model; ode-error measures a consistency student")
    denoiser = load_model(teacher, network, device)
    if denoiser.kind != "diffusion":
        raise CliError(
            f"--teacher must be a diffusion checkpoint; {denoiser.checkpoint} was trained with {denoiser.objective!r}"
        )
    if tuple(denoiser.sample_shape) != tuple(model.sample_shape):
        raise CliError(f"student makes {model.sample_shape} images but the teacher {denoiser.sample_shape}")
    labels = None
    if model.num_classes:
        if class_label is not None:
            labels = torch.full((num,), class_label, dtype=torch.long)
        else:
            labels = torch.arange(num) % model.num_classes
    elif class_label is not None:
        raise click.UsageError(f"--class-label: {model.checkpoint} is unconditional")
    import cm_core

    from .sample import plan

    own = {}
    if "multistep" in cm_core.function_kind(model.kind).samplers:
        student_sigmas = default_sigmas(model, "multistep", nfe)
    else:  # a kind with its own sampler (sCM's TrigFlow times, MeanFlow's): as `cm sample` plans it
        name, student_sigmas, options, _ = plan(model, "auto", nfe, None, None, None)
        own = {"sampler": name, "sampler_options": options}
    r = cm_eval.ode_solving_error(
        model.function,
        denoiser.function,
        seeds=num,
        shape=model.sample_shape,
        student_sigmas=student_sigmas,
        **own,
        renoise=model.renoise,
        teacher_sigmas=cm_eval.default_teacher_sigmas(teacher_points, denoiser.sigma_min, denoiser.sigma_max),
        cache=cache,
        batch_size=batch_size,
        labels=labels,
        progress=progress("teacher ODE"),
        device=device,
    )
    _finish(
        f"ODE error: MSE {r['mse']:.6g}  RMSE {r['rmse']:.6g}  L2 {r['l2']:.6g} "
        f"({r['num_images']} images, student NFE {nfe}, teacher NFE {r['teacher_nfe']})",
        r,
        json_path,
        overwrite,
    )


@evaluate.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--metric", type=click.Choice(["fd-digits"]), default="fd-digits", show_default=True)
@click.option("--nfe", "nfe_list", default="1,2,4", show_default=True, help="NFE values to sweep, e.g. 1,2,4.")
@click.option("--num", type=click.IntRange(min=2), default=1000, show_default=True, help="Images per point.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Plot PNG (metric vs NFE).")
@batch_option(256)
@network_option
@device_option
@json_option
@overwrite_option
def sweep(checkpoint, metric, nfe_list, num, out, batch_size, network, device, json_path, overwrite):
    """A metric vs NFE on the default σ schedules of `cm sample`, plotted to --out.

    Consistency models sample with multistep on the Karras grid; BCM models with the
    ancestral chain; sCM and MeanFlow models with their own samplers. The same seeds are used at every NFE.

    \b
    Example:
      cm eval sweep runs/digits-ict --metric fd-digits --nfe 1,2,4 --out sweep.png --json sweep.json
    """
    import cm_eval

    nfes = parse_ints(nfe_list, "--nfe")
    out = check_out(out, overwrite)
    _precheck(json_path, overwrite)
    model = load_model(checkpoint, network, device)
    if model.kind == "diffusion":
        raise CliError(f"sweep needs a consistency or BCM checkpoint; {model.checkpoint} is a diffusion model")
    import cm_core

    kind = cm_core.function_kind(model.kind)
    if model.kind == "bcm":
        sampler, options = "bcm-ancestral", {}
    elif "multistep" in kind.samplers:
        sampler, options = "multistep", {"sigma_min": model.sigma_min, "renoise": model.renoise}
    else:  # sCM / MeanFlow: their own sampler and time lists
        sampler, options = kind.default_sampler, {}
    lists = [default_sigmas(model, sampler, k, recipe=False) for k in nfes]  # the Karras sweep
    metrics = {"fd-digits": cm_eval.fd_digits}
    result = cm_eval.nfe_sweep(
        model.function,
        metrics[metric],
        {"karras": lists},
        seeds=num,
        shape=model.sample_shape,
        sampler=sampler,
        batch_size=batch_size,
        num_classes=model.num_classes or None,
        device=device,
        progress=progress("sweep", unit="schedule"),
        **options,
    )
    cm_eval.plot_metric_vs_nfe(result, out, metric_name=metric)
    rows = result["karras"]
    _finish(
        f"{metric} vs NFE: " + ", ".join(f"{r['nfe']}: {r['metric']:.4f}" for r in rows) + f"; plot {out}",
        result,
        json_path,
        overwrite,
    )


def _noise_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(
            f"{text!r} is not a shape; give one image's sizes as positive integers, e.g. 4,128,128",
            param_hint="--shape",
        )
    return shape


@evaluate.command("make-noise")
@click.option("--shape", required=True, help="One image's noise shape, comma-separated, e.g. 4,128,128 (SDXL latents).")
@click.option("--num", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True, help="Noise seed.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The noise file (.pt) to write.")
@overwrite_option
def make_noise(shape, num, seed, out, overwrite):
    """Write fixed initial noise [NUM, *SHAPE] (float32) for text-to-image evaluation.

    Image i's noise depends only on (--seed, i): the first k images of a file are those of
    a file made with --num k. The file holds only tensors and plain values (cm_eval.load_noise
    reads it with torch.load(weights_only=True)).

    \b
    Example:
      cm eval make-noise --shape 4,128,128 --num 10000 --seed 0 --out init_noise.pt
    """
    import cm_eval

    shape = _noise_shape(shape)
    out = check_out(out, overwrite)
    noise = cm_eval.make_noise(shape, num, seed)
    cm_eval.save_noise(out, noise, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out}: noise {'×'.join(map(str, noise.shape))} float32, seed {seed}")


COMMANDS = [evaluate]
