"""Text-to-image evaluation as the Direct CM paper does it (Vouitsis et al. 2024): teacher and
student sample from the same initial noise, and the student is scored against the teacher.

* :func:`teacher_samples` solves the guided teacher's PF-ODE (DDIM/Euler/Heun on LCM's grid of
  ``steps`` points) from each image's noise; :func:`student_samples` runs LCM sampling at a given NFE
  from the same noise (the re-noising ε of image i comes from its own generator, so a sample does not
  depend on the batch it was drawn in).
* :func:`ode_error` is the ODE solving error: the latent MSE between the student's sample and the
  teacher's solution from the same noise. FID / FD-DINOv2 of student against teacher images use
  cm-eval's feature extractors; CLIP score and the LAION aesthetic score come from
  :mod:`cm_eval.clip_metrics` (weights from user paths).

``f`` is a :class:`cm_core.LatentConsistencyFunction` over a text-to-image network (cm_nets'
DiffusersNet), whose adapters-off base model is the teacher.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["read_prompts", "teacher_samples", "student_samples", "decode", "ode_error", "per_image_noise"]


def read_prompts(path) -> list[str]:
    """One prompt per line (UTF-8; blank lines skipped); an empty or missing file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: write one prompt per line")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts: write one prompt per line")
    return prompts


def per_image_noise(seed: int, indices: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``randn_like`` whose row j draws from image ``indices[j]``'s own generator (seeded from
    (seed, index)); successive calls continue each image's stream."""
    gens = []
    for i in indices:
        digest = hashlib.sha256(f"cm-t2i-renoise:{int(seed)}:{int(i)}".encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))

    def like(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(x.shape[1:]), generator=g) for g in gens]).to(x)

    return like


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield range(start, min(start + batch_size, n))


def _check(noise: torch.Tensor, prompts: Sequence[str], f) -> None:
    if len(prompts) != len(noise):
        raise ValueError(f"{len(prompts)} prompts for {len(noise)} noise images: give one prompt per image")
    shape = tuple(getattr(f.net, "latent_shape", noise.shape[1:]))
    if tuple(noise.shape[1:]) != shape:
        raise ValueError(f"the noise has shape {tuple(noise.shape[1:])} per image but the model's latents are {shape}: "
                         f"make it with cm eval make-noise --shape {','.join(map(str, shape))}")  # fmt: skip


@torch.no_grad()
def teacher_samples(f, noise: torch.Tensor, prompts: Sequence[str], *, steps: int = 50, guidance: float = 8.0,
                    solver: str = "ddim", batch_size: int = 8, device=None, progress=None) -> torch.Tensor:  # fmt: skip
    """The guided teacher's ODE solutions [N, C, h, w] (latents) from ``noise`` [N, C, h, w]: ``steps``
    solver steps on LCM's grid (k−1 … T−1, then to ᾱ_0), guidance w in diffusers' scale."""
    from cm_core import discrete

    _check(noise, prompts, f)
    device = torch.device(device or noise.device)
    vp = f.vp
    ts = discrete.lcm_grid(vp.num_train_timesteps, steps).flip(0).tolist() + [0]
    out = []
    for idx in _batches(len(noise), batch_size):
        emb = f.encode([prompts[i] for i in idx])
        x = noise[idx.start : idx.stop].to(device)
        b = x.shape[0]
        for t, t_prev in zip(ts, ts[1:]):
            x = discrete.solver_step(
                vp, lambda a, tt: f.teacher_x0_eps(a, tt, emb, guidance), x,
                torch.full((b,), t), torch.full((b,), t_prev), solver,
            )  # fmt: skip
        out.append(x.cpu())
        if progress:
            progress(b)
    return torch.cat(out)


@torch.no_grad()
def student_samples(f, noise: torch.Tensor, prompts: Sequence[str], nfe: int, *, original_steps: int = 50,
                    seed: int = 0, batch_size: int = 8, device=None, progress=None) -> torch.Tensor:  # fmt: skip
    """The student's LCM samples [N, C, h, w] at ``nfe`` steps (LCMScheduler's timesteps for
    ``original_steps``) from ``noise``; re-noising ε per image from (seed, image index)."""
    from cm_core import discrete

    _check(noise, prompts, f)
    device = torch.device(device or noise.device)
    ts = discrete.lcm_inference_timesteps(nfe, f.vp.num_train_timesteps, original_steps)
    out = []
    for idx in _batches(len(noise), batch_size):
        emb = f.encode([prompts[i] for i in idx])
        z = noise[idx.start : idx.stop].to(device)
        x = discrete.lcm_sample(f, f.vp, z, ts, randn_like=per_image_noise(seed, list(idx)), **emb)
        out.append(x.cpu())
        if progress:
            progress(len(idx))
    return torch.cat(out)


@torch.no_grad()
def decode(net, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Latents → images in [−1, 1] through the network's VAE (``net.decode_latents``), batch by batch."""
    return torch.cat([net.decode_latents(latents[i.start : i.stop]).cpu() for i in _batches(len(latents), batch_size)])


def ode_error(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The ODE solving error: mean squared latent difference (float64) between the student's samples
    and the teacher's solutions from the same noise."""
    if student.shape != teacher.shape:
        raise ValueError(f"student latents {tuple(student.shape)} and teacher latents {tuple(teacher.shape)} differ in shape")
    return float(((student.double() - teacher.double()) ** 2).mean())
