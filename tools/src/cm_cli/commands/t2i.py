"""``cm t2i``: text-to-image LoRA distillation of a local Stable Diffusion pipeline (SD 1.5 / SDXL):
cache a caption dataset's latents, sample teacher and student from the same initial noise, and score
the student against the teacher (ODE solving error, FID, FD-DINOv2, CLIP score, aesthetic score)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .._common import CliError, batch_option, check_out, device_option, overwrite_option, parse_ints, remove_output


@click.group("t2i")
def t2i() -> None:
    """Text-to-image distillation of a diffusers pipeline with LoRA (recipes: configs/*-lora.toml).

    \b
    Example (the README's "Distil SDXL with LoRA" has the whole sequence):
      cm t2i sample runs/lcm-sdxl-lora --prompts prompts.txt --noise init_noise.pt --out eval/lcm
      cm t2i eval eval/lcm --inception pt_inception-2015-12-05-6726825d.pth
    """


# ---- cache-latents --------------------------------------------------------------------------------


@t2i.command("cache-latents")
@click.argument("pipeline", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--resolution", type=click.IntRange(min=8), default=None, help="Crop size (default: the model's).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The latent cache folder to write.")
@click.option("--sample/--mean", "sample_latents", default=False, show_default=True,
              help="Store a draw of the VAE's latent distribution (seeded) instead of its mean.")  # fmt: skip
@batch_option(16)
@device_option
@overwrite_option
def cache_latents(pipeline, data, resolution, out, sample_latents, batch_size, device, overwrite):
    """Encode DATA (a caption folder or manifest) once with PIPELINE's VAE into a latent cache.

    Train on it with data.source="latents" data.path=OUT: repeated runs skip the VAE.

    \b
    Example:
      cm t2i cache-latents models/sdxl-base data/captions --out data/latents --device cuda
    """
    import torch
    from cm_nets.diffusers_net import DiffusersNet
    from cm_train.captions import CaptionDataset, cache_latents as write_cache

    net = DiffusersNet.load(pipeline).to(device)
    dataset = CaptionDataset(data, resolution or net.resolution)
    gen = torch.Generator(device).manual_seed(0) if sample_latents else None
    folder = write_cache(
        dataset, lambda x: net.encode_images(x.to(device), generator=gen).cpu(), out, batch_size=batch_size,
        overwrite=overwrite, encoder=str(Path(pipeline).expanduser().resolve()),
    )  # fmt: skip
    click.echo(f"wrote {folder}: {len(dataset)} latents of shape {tuple(net.latent_shape)} from {data}")


# ---- sample -----------------------------------------------------------------------------------------


def _load_run(run: Path, pipeline: str | None, device: str):
    """(net with the run's newest verified LoRA, its run config, the checkpoint) from a run folder or
    one of its checkpoint folders."""
    import cm_train
    from cm_nets.diffusers_net import DiffusersNet

    run = Path(run)
    if (run / "meta.json").is_file():  # a checkpoint folder
        ckpt, run_dir = run, run.parent.parent
    else:
        if not (run / "checkpoints").is_dir():
            raise CliError(f"{run} is neither a cm-train run folder (no checkpoints/) nor a checkpoint folder")
        ckpt, run_dir = cm_train.usable_checkpoint(run), run
        if ckpt is None:
            raise CliError(f"{run} has no checkpoint yet: train first (cm train …)")
    networks, _, meta = cm_train.load_checkpoint(ckpt)
    cfg = meta.get("config") or {}
    model = cfg.get("model") or {}
    if not model.get("pipeline"):
        raise CliError(f"{ckpt} is not a text-to-image LoRA run (its config has no model.pipeline); use cm sample")
    folder = pipeline or model["pipeline"]
    net = DiffusersNet.load(folder, dtype=model.get("pipeline_dtype", "fp32"), lora=dict(model.get("lora") or {}))
    net.load_state_dict(networks["net"])
    return net.to(device).eval(), cfg, ckpt, run_dir


def _default_guidance(kwargs: dict) -> float:
    rng = kwargs.get("guidance_range")
    if rng:
        return (float(rng[0]) + float(rng[1])) / 2
    return float(kwargs.get("guidance_scale", 8.0))


def _save_set(out: Path, name: str, latents, images) -> None:
    import cm_eval

    pngs = out / name
    pngs.mkdir(parents=True, exist_ok=True)
    u8 = cm_eval.to_uint8(images)
    for i, img in enumerate(u8):
        cm_eval.save_png(pngs / f"{i:05d}.png", img)
    cm_eval.atomic_save_npz(out / f"{name}.npz", arr_0=u8, latents=latents.float().numpy())


@t2i.command("sample")
@click.argument("run", type=click.Path(exists=True))
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="Prompts, one per line (one per image).")
@click.option("--noise", required=True, type=click.Path(dir_okay=False), help="Initial noise from `cm eval make-noise`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the samples.")
@click.option("--nfe", "nfe_list", default="1,2,4,8", show_default=True, help="Student NFE values.")
@click.option("--teacher/--no-teacher", default=True, show_default=True, help="Also solve the teacher's ODE.")
@click.option("--teacher-points", "teacher_steps", type=click.IntRange(min=1), default=None,
              help="Points of the teacher's solver grid (LCM's k−1 … T−1), one step each (default: the run's num_original_inference_steps).")  # fmt: skip
@click.option("--guidance", type=click.FloatRange(min=0), default=None,
              help="Teacher guidance, diffusers' scale (default: the run's; a range's midpoint).")  # fmt: skip
@click.option("--solver", type=click.Choice(["ddim", "euler", "heun"]), default=None,
              help="Teacher solver (default: the run's).")  # fmt: skip
@click.option("--pipeline", type=click.Path(), default=None, help="The pipeline folder, if it moved since training.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the students' re-noising.")
@batch_option(8)
@device_option
@overwrite_option
def sample(run, prompts, noise, out, nfe_list, teacher, teacher_steps, guidance, solver, pipeline, seed, batch_size,
           device, overwrite):  # fmt: skip
    """Teacher and student samples of a LoRA RUN from the same initial noise, as PNGs and .npz.

    Writes OUT/teacher/*.png + OUT/teacher.npz (the teacher's guided ODE solutions), OUT/nfe-N/*.png +
    OUT/nfe-N.npz per student NFE (arr_0: uint8 images, latents: the latents), and OUT/samples.json.

    \b
    Example:
      cm eval make-noise --shape 4,128,128 --num 1000 --out init_noise.pt
      cm t2i sample runs/lcm-sdxl-lora --prompts prompts.txt --noise init_noise.pt --out eval/lcm --device cuda
    """
    import cm_core
    import cm_eval
    from cm_eval import t2i as T

    nfes = parse_ints(nfe_list, "--nfe")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CliError(f"{out} exists and is not empty; pass --overwrite to replace it")
        remove_output(out)
    check_out(out / "samples.json", True)
    text = T.read_prompts(prompts)
    z, noise_meta = cm_eval.load_noise(noise)
    if len(text) != len(z):
        raise CliError(f"{prompts} holds {len(text)} prompts but {noise} {len(z)} noise images: give one prompt per image")
    net, cfg, ckpt, run_dir = _load_run(Path(run), pipeline, device)
    f = cm_core.LatentConsistencyFunction(net)
    kwargs = (cfg.get("objective") or {}).get("kwargs") or {}
    original = int(kwargs.get("num_original_inference_steps", 50))
    steps = teacher_steps or original
    w = _default_guidance(kwargs) if guidance is None else guidance
    solver = solver or kwargs.get("solver", "ddim")
    record = {"run": str(run_dir), "checkpoint": str(ckpt), "pipeline": net.path, "prompts": text,
              "noise": str(noise), "noise_seed": noise_meta.get("seed"), "seed": seed, "nfe": nfes,
              "original_inference_steps": original, "teacher": None}  # fmt: skip
    t0 = time.perf_counter()
    if teacher:
        click.echo(f"teacher: {solver} × {steps} steps, guidance {w:g}, {len(z)} images", err=True)
        lat = T.teacher_samples(f, z, text, steps=steps, guidance=w, solver=solver, batch_size=batch_size, device=device)
        _save_set(out, "teacher", lat, T.decode(net, lat, batch_size))
        record["teacher"] = {"steps": steps, "guidance": w, "solver": solver}
    for n in nfes:
        click.echo(f"student: {n} NFE, {len(z)} images", err=True)
        lat = T.student_samples(f, z, text, n, original_steps=original, seed=seed, batch_size=batch_size, device=device)
        _save_set(out, f"nfe-{n}", lat, T.decode(net, lat, batch_size))
    cm_eval.write_report(out / "samples.json", record)
    click.echo(f"wrote {out}: {'teacher + ' if teacher else ''}students at {nfe_list} NFE, {len(z)} images each "
               f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip


# ---- eval ---------------------------------------------------------------------------------------


def _sets(folder: Path) -> dict:
    import numpy as np

    sets = {}
    for p in sorted(folder.glob("*.npz")):
        if p.stem == "teacher" or p.stem.startswith("nfe-"):
            with np.load(p) as d:
                if "arr_0" not in d.files or "latents" not in d.files:
                    raise CliError(f"{p} is not a `cm t2i sample` output (needs arr_0 and latents)")
                sets[p.stem] = {"images": d["arr_0"], "latents": d["latents"]}
    return sets


@t2i.command("eval")
@click.argument("samples", type=click.Path(exists=True, file_okay=False))
@click.option("--inception", type=click.Path(dir_okay=False), default=None, help="FID Inception-v3 weights: adds FID.")
@click.option("--dino", type=click.Path(dir_okay=False), default=None, help="DINOv2 ViT-L/14 weights: adds FD-DINOv2.")
@click.option("--clip-weights", type=click.Path(dir_okay=False), default=None, help="open_clip weights: adds CLIP score.")
@click.option("--clip-arch", default="ViT-L-14-quickgelu", show_default=True, help="open_clip architecture of --clip-weights.")
@click.option("--aesthetic", type=click.Path(dir_okay=False), default=None,
              help="LAION aesthetic predictor (sac+logos+ava1-l14-linearMSE.pth; needs --clip-weights of ViT-L/14).")  # fmt: skip
@batch_option(32)
@device_option
def evaluate_t2i(samples, inception, dino, clip_weights, clip_arch, aesthetic, batch_size, device):
    """Score SAMPLES (a `cm t2i sample` folder): each student NFE against the teacher.

    Writes SAMPLES/metrics.json and SAMPLES/report.html (grids per NFE), and appends the numbers to
    the run's metrics.jsonl (and TensorBoard when installed) under t2i/….

    \b
    Example:
      cm t2i eval eval/lcm --inception pt_inception-2015-12-05-6726825d.pth --clip-weights open_clip_vitl14.bin
    """
    import cm_eval
    import torch
    from cm_eval import t2i as T

    folder = Path(samples)
    meta_path = folder / "samples.json"
    if not meta_path.is_file():
        raise CliError(f"{folder} has no samples.json: give a folder written by `cm t2i sample`")
    meta = json.loads(meta_path.read_text())
    sets = _sets(folder)
    if "teacher" not in sets:
        raise CliError(f"{folder} has no teacher.npz: sample with --teacher to compare against the teacher")
    if aesthetic and not clip_weights:
        raise click.UsageError("--aesthetic scores CLIP ViT-L/14 image features: pass --clip-weights too")
    students = sorted((k for k in sets if k != "teacher"), key=lambda k: int(k.split("-")[1]))
    teacher = sets["teacher"]
    rows, metrics = [], {}

    def fd(extractor, key, name):
        ref = cm_eval.compute_stats(extractor, teacher["images"], key=key, value_range=(0.0, 1.0), batch_size=batch_size)
        mu_t, sig_t = ref.mean(), ref.cov()
        for s in students:
            st = cm_eval.compute_stats(extractor, sets[s]["images"], key=key, value_range=(0.0, 1.0), batch_size=batch_size)
            metrics.setdefault(s, {})[name] = cm_eval.frechet_distance(st.mean(), st.cov(), mu_t, sig_t)

    for s in students:
        metrics.setdefault(s, {})["ode_mse"] = T.ode_error(torch.from_numpy(sets[s]["latents"]), torch.from_numpy(teacher["latents"]))
    if inception:
        fd(cm_eval.inception_fid(inception).to(device), "pool", "fid_vs_teacher")
    if dino:
        fd(cm_eval.dinov2(dino).to(device), "features", "fd_dino_vs_teacher")
    if clip_weights:
        from cm_eval import clip_metrics as C

        clip = C.load_clip(clip_arch, clip_weights, device=device)
        predictor = C.load_aesthetic(aesthetic, device=device) if aesthetic else None
        for name in ["teacher", *students]:
            imgs = torch.from_numpy(sets[name]["images"]).permute(0, 3, 1, 2).float() / 255
            metrics.setdefault(name, {})["clip_score"] = float(C.clip_score(clip, imgs, meta["prompts"], batch_size=batch_size).mean())
            if predictor is not None:
                metrics[name]["aesthetic"] = float(C.aesthetic_score(clip, predictor, imgs).mean())
    columns = ["samples", *sorted({k for m in metrics.values() for k in m})]
    for name in ["teacher", *students]:
        rows.append([name, *[metrics.get(name, {}).get(c, "") for c in columns[1:]]])
    cm_eval.write_report(folder / "metrics.json", {"samples": meta, "metrics": metrics})
    grids = []
    for name in ["teacher", *students]:
        path = folder / f"grid-{name}.png"
        cm_eval.save_png(path, cm_eval.image_grid(sets[name]["images"][:64], ncol=8, pad=2))
        grids.append({"path": str(path), "caption": name, "scale": 1})
    cm_eval.html_report(
        folder / "report.html", title="Text-to-image distillation: student vs teacher",
        intro=f"Run {meta.get('run')} ({meta.get('checkpoint')}), {len(teacher['images'])} prompts, the same initial "
              f"noise ({meta.get('noise')}). ODE error: latent MSE to the teacher's solution.",
        sections=[{"heading": "Metrics", "table": {"columns": columns, "rows": rows}},
                  {"heading": "Samples per NFE", "images": grids,
                   "text": "Prompts in grid order (row by row, 8 per row): "
                           + "; ".join(f"{i + 1}. {p}" for i, p in enumerate(meta["prompts"][:64]))}],
    )  # fmt: skip
    _log_to_run(meta, metrics)
    for row in rows:
        click.echo("  ".join(f"{c}={v:.4g}" if isinstance(v, float) else f"{c}={v}" for c, v in zip(columns, row) if v != ""))
    click.echo(f"wrote {folder / 'metrics.json'} and {folder / 'report.html'}")


def _log_to_run(meta: dict, metrics: dict) -> None:
    """Append to the run's metrics.jsonl (one record at the checkpoint's step) and TensorBoard."""
    import cm_train

    run = Path(meta.get("run") or "")
    if not (run / "checkpoints").is_dir():
        return
    try:
        step = int(Path(meta["checkpoint"]).name.split("-")[-1])
    except (KeyError, ValueError):
        step = 0
    record = {"step": step, **{f"t2i/{name}/{k}": v for name, m in metrics.items() for k, v in m.items()}}
    cm_train.append_metrics(run, record)


COMMANDS = [t2i]
