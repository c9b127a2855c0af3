"""Trained models back from checkpoints: the wrapped function, what it is, and its data's shape.

    model = cm_train.load_trained("runs/digits-ict")        # a run folder: its best, else latest, checkpoint
    x = cm_core.onestep_sample(model.function, z, **model.cond(labels))

A checkpoint folder carries its resolved config and data shape in ``meta.json`` (older ones fall
back to the run folder's ``config.json``), so sampling, editing and evaluation need nothing but
its path. Weights load from safetensors; no pickled code runs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import cm_nets
import torch

from .checkpoint import CheckpointCorrupt, first_bad_file, incomplete_checkpoints, latest_checkpoint
from .config import Config, load_config
from .loop import build_function, function_kind_of

__all__ = ["TrainedModel", "load_trained", "resolve_checkpoint", "kind_of"]


def kind_of(objective: str) -> str:
    """The kind of function ``objective`` trains, as it declares: "consistency" (f(x, σ)), "bcm"
    (f(x, σ, σ_end)), "diffusion" (a denoiser D(x, σ)) or a kind a plugin registers."""
    try:
        return function_kind_of(objective).name
    except ValueError as exc:  # ConfigError is a ValueError
        raise ValueError(str(exc).removeprefix("objective.name: ")) from None


@dataclass(frozen=True)
class TrainedModel:
    function: torch.nn.Module  # eval mode, no grad needed
    kind: str  # consistency | bcm | diffusion
    objective: str
    sample_shape: tuple[int, ...]
    num_classes: int  # 0: unconditional
    sigma_min: float  # the σ_min it samples with (model.sample_sigma_min, else model.sigma_min)
    sigma_max: float
    sigma_data: float
    checkpoint: Path
    network: str  # which weights: "net", "ema-<name>" or "target"
    config: Config
    renoise: str = "cm"  # multistep re-noising: "cm" √(σ² − σ_min²)·ε, "ect" σ·ε (model.sample_renoise)
    sample_sigmas: tuple[float, ...] = ()  # the recipe's multistep σ list (model.sample_sigmas), if any

    def cond(self, labels: torch.Tensor | None) -> dict:
        """Keyword arguments for the function: class labels when the model is conditional."""
        if not self.num_classes:
            return {}
        if labels is None:
            raise ValueError(f"{self.checkpoint} is class-conditional ({self.num_classes} classes): give class labels")
        return {"class_labels": labels}

    def describe(self) -> str:
        cond = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        shape = "×".join(map(str, self.sample_shape))
        return f"{self.objective} ({self.kind}) model, {shape} samples, {cond}, weights {self.network}"


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder from itself or from a run folder (best.json's checkpoint, else the latest)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run folder or one of its checkpoints/step-* folders")
    if (path / "meta.json").is_file():
        return path
    if path.is_file():
        raise ValueError(
            f"{path} is a file; give a cm-train checkpoint folder (…/checkpoints/step-00001000) or a run folder"
        )
    best = path / "best.json"
    if best.is_file():
        chosen = Path(json.loads(best.read_text())["checkpoint"])
        if not chosen.is_absolute() and not chosen.exists():
            chosen = path / "checkpoints" / chosen.name
        if (chosen / "meta.json").is_file():
            return chosen
    latest = latest_checkpoint(path)
    newer = [p for p in incomplete_checkpoints(path) if latest is None or p.name > latest.name]
    if newer:
        warnings.warn(
            f"{', '.join(str(p) for p in newer)} has no meta.json (never committed, or damaged): skipped"
            + (f"; using {latest.name}" if latest is not None else ""),
            stacklevel=2,
        )
    if latest is None:
        raise FileNotFoundError(f"{path} holds no cm-train checkpoint (no meta.json, no checkpoints/step-* folder)")
    return latest


def _pick_network(ckpt: Path, network: str) -> str:
    names = sorted(p.stem for p in ckpt.glob("*.safetensors") if not p.stem.startswith("extra-"))
    if network == "ema":
        emas = [n for n in names if n.startswith("ema-")]
        if emas:
            return emas[0]
        network = "net"
    if network not in names:
        raise ValueError(f"{ckpt} has no network {network!r}; it has {', '.join(names) or 'none'}")
    return network


def _verify_network(ckpt: Path, meta: dict, name: str) -> None:
    """Check the chosen network's files against the checkpoint's checksums; when they fail, say
    which other network of the checkpoint does verify (``--network``)."""
    def bad(stem: str) -> tuple[str, str] | None:
        return first_bad_file(ckpt, meta, [f"{stem}.safetensors", f"{stem}.json"])

    broken = bad(name)
    if broken is None:
        return
    others = sorted(p.stem for p in ckpt.glob("*.safetensors") if p.stem != name and not p.stem.startswith("extra-"))
    good = [o for o in others if bad(o) is None]
    hint = f"; these verify: {', '.join(good)} (choose one with --network)" if good else ""
    raise CheckpointCorrupt(ckpt / broken[0], f"{broken[1]}{hint}")


def load_trained(path, *, network: str = "ema", device="cpu") -> TrainedModel:
    """Load a trained model. ``network``: "ema" (the first EMA, else the online weights), "net",
    "target" or "ema-<name>"."""
    ckpt = resolve_checkpoint(path)
    meta = json.loads((ckpt / "meta.json").read_text())
    if "config" in meta:
        cfg = load_config(meta["config"])
    else:
        run_config = ckpt.parent.parent / "config.json"
        if not run_config.is_file():
            raise ValueError(f"{ckpt} has no config in meta.json and {run_config} is missing")
        cfg = load_config(str(run_config))
    if cfg.model.pipeline:  # LoRA on a diffusers pipeline: text-conditioned, sampled by prompts
        raise ValueError(
            f"{ckpt} is a text-to-image LoRA run of {cfg.model.pipeline}: sample it with "
            f"`cm t2i sample {ckpt.parent.parent} --prompts FILE --noise FILE --out DIR` (its LoRA is in "
            f"{ckpt.parent.parent / 'lora'} for diffusers' load_lora_weights)"
        )
    objective = meta.get("objective", cfg.objective.name)
    kind = kind_of(objective)
    if "data" in meta:
        shape, num_classes = tuple(meta["data"]["sample_shape"]), int(meta["data"]["num_classes"])
    else:  # older checkpoints: the dataset itself says
        from .data import build_dataset

        ds = build_dataset(cfg.data, cfg.run.seed)
        shape, num_classes = tuple(ds.sample_shape), ds.num_classes if cfg.data.conditional else 0
    name = _pick_network(ckpt, network)
    _verify_network(ckpt, meta, name)
    try:
        net = cm_nets.load(ckpt / f"{name}.safetensors", map_location=device)
    except (ValueError, OSError, RuntimeError) as exc:  # an unchecked (older) checkpoint's bad file
        raise CheckpointCorrupt(ckpt / f"{name}.safetensors", f"not loadable ({exc})") from None
    # The function the model samples with: ECT trains with EDM's scalings and samples with the
    # shifted boundary at its own σ_min (model.sample_boundary / model.sample_sigma_min).
    f = build_function(objective, net, cfg, sampling=True).eval().requires_grad_(False)
    kwargs = cfg.objective.kwargs
    return TrainedModel(
        function=f,
        kind=kind,
        objective=objective,
        sample_shape=shape,
        num_classes=num_classes,
        sigma_min=float(cfg.model.eval_sigma_min),
        sigma_max=float(kwargs.get("sigma_max", 80.0)),
        sigma_data=float(cfg.model.sigma_data),
        checkpoint=ckpt,
        network=name,
        config=cfg,
        renoise=cfg.model.sample_renoise,
        sample_sigmas=tuple(cfg.model.sample_sigmas),
    )
