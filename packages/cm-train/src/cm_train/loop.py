"""The training loop: build the run's state, then step and call back until done, for 1 rank or many.

run(config)  →  Trainer: TrainState (state.py) + train_step (step.py) + callbacks (callbacks.py)
    loop: train_step(state, batch) → divergence guard → callbacks (logs, progress, sample grids)
          → checkpoint (best metric, early stop) ; resume continues bit-exactly.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import cm_core
import cm_kernels
import cm_nets
import torch

from . import distributed, threads
from .callbacks import (
    BestCheckpoint,
    Callback,
    Metric,
    MetricsLog,
    ProgressBar,
    SampleGrids,
    broadcast_value,
    loss_metric,
)
from .checkpoint import atomic_write_text, latest_checkpoint, load_checkpoint, save_checkpoint, usable_checkpoint
from .config import Config, ConfigError, config_to_dict, resume_changes
from .data import BatchStream, build_dataset
from .images import make_grid, write_png
from .state import EMA, TrainState, trainable_params
from .step import StepContext, train_step

__all__ = ["run", "build_function", "function_kind_of", "Trainer", "DivergenceError", "Interrupted", "EMA"]

# The exit status of `cm train` / `python -m cm_train` after a signal stopped the run with a committed
# checkpoint (EX_TEMPFAIL): a requeue script tests for it and runs the same command again to resume.
EXIT_INTERRUPTED = 75


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGUSR1 stopped the run after a finished step and a committed checkpoint.
    ``exit_code`` (75) is what `cm train` and `python -m cm_train` exit with."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, signame: str, step: int, checkpoint) -> None:
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(
            f"{signame}: stopped after step {step} with checkpoint {checkpoint}; run the same command "
            f"again to resume (exit status {EXIT_INTERRUPTED})"
        )


class _StopSignals:
    """Turns SIGINT / SIGTERM / SIGUSR1 into a request to stop after the current step (SLURM sends
    SIGTERM, or SIGUSR1 with --signal, before a time limit). A second SIGINT abandons at once."""

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signame: str | None = None
        self._old: dict = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if hasattr(signal, name):
                    num = getattr(signal, name)
                    self._old[num] = signal.signal(num, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.signame is not None and name == "SIGINT":
            raise KeyboardInterrupt  # pressed twice: abandon the step, no checkpoint
        self.signame = self.signame or name

    def __exit__(self, *exc) -> None:
        import signal

        for num, old in self._old.items():
            signal.signal(num, old)
        self._old.clear()


class DivergenceError(RuntimeError):
    """Training kept producing non-finite values after the allowed rollbacks."""


def function_kind_of(objective: str) -> cm_core.FunctionKind:
    """The kind of function ``objective`` trains, as the objective declares it."""
    try:
        return cm_core.function_kind(cm_core.get_objective(objective).function)
    except ValueError as exc:
        raise ConfigError(f"objective.name: {exc}") from None


def build_function(objective: str, net: torch.nn.Module, cfg: Config, *, sampling: bool = False) -> torch.nn.Module:
    """Wrap a raw network into what the objective trains (its declared function kind: f(x, σ),
    f(x, σ, σ_end), D(x, σ), …).

    ``sampling=True``: the function the trained model samples with (``model.sample_boundary`` and
    ``model.sample_sigma_min``; ECT trains with EDM's scalings and samples with the shifted boundary)."""
    m = cfg.model
    return function_kind_of(objective).build(
        net,
        sigma_data=m.sigma_data,
        sigma_min=m.eval_sigma_min if sampling else m.sigma_min,
        c_noise=m.c_noise,
        boundary=m.eval_boundary if sampling else m.boundary,
    )


def _pipeline_net(cfg: Config, dataset, say) -> torch.nn.Module:
    """model.pipeline: a local diffusers pipeline folder with LoRA adapters (cm_nets.diffusers_net.DiffusersNet)."""
    m = cfg.model
    kind = function_kind_of(cfg.objective.name)
    if kind.name != "latent-consistency":
        raise ConfigError(
            f"model.pipeline is a text-to-image diffusers model; objective {cfg.objective.name!r} trains a "
            f"{kind.name!r} function: use objective.name = \"lcm\" or \"latent-direct-cm\" (or drop model.pipeline)"
        )
    if cfg.ema:
        raise ConfigError(
            "model.pipeline trains LoRA adapters without an EMA (as LCM-LoRA): set ema = [] in the config "
            "(an EMA would copy the whole pipeline)"
        )
    if not m.lora:
        raise ConfigError("model.pipeline needs model.lora = {rank = …}: only LoRA adapters train (e.g. rank = 64)")
    unknown = sorted(set(m.lora) - {"rank", "alpha", "targets", "dropout"})
    if unknown:
        raise ConfigError(f"model.lora.{unknown[0]} is not a LoRA setting; valid: rank, alpha, targets, dropout")
    rank = m.lora.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"model.lora.rank must be a positive integer (e.g. 64), got {rank!r}")
    if not hasattr(dataset, "conditioning"):
        raise ConfigError(
            f"model.pipeline trains on (image, caption) pairs, but data.source = {cfg.data.source!r} has no captions: "
            "use data.source = \"captions\" (a folder with .txt captions, or a .jsonl/.csv/.parquet manifest) or \"latents\""
        )
    try:
        from cm_nets.diffusers_net import DiffusersNet

        net = DiffusersNet.load(m.pipeline, dtype=m.pipeline_dtype, lora=dict(m.lora))
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise ConfigError(f"model.pipeline: {exc}") from None
    if m.gradient_checkpointing:
        net.unet.enable_gradient_checkpointing()
    shape = tuple(dataset.sample_shape)
    if len(shape) != 3 or shape[0] not in (3, net.latent_channels):
        raise ConfigError(
            f"data {dataset.name}: samples of shape {shape} are neither RGB images nor {net.latent_channels}-channel "
            f"latents of the model in {m.pipeline}"
        )
    if shape[0] == net.latent_channels and shape[0] != 3:
        encoder = getattr(dataset, "encoder", "")
        if encoder and Path(encoder).expanduser().resolve() != Path(m.pipeline).expanduser().resolve():
            say(f"warning: the latents in {dataset.name} were encoded by {encoder}, not by model.pipeline {m.pipeline}")
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    say(f"model: {net.kind.upper()} pipeline {m.pipeline} ({net.resolution}px, {net.prediction_type}); "
        f"LoRA rank {net.lora['rank']}, alpha {net.lora['alpha']:g}: {trainable:,} trainable parameters")  # fmt: skip
    return net


def _net_meta(net: torch.nn.Module) -> dict | None:
    conf = getattr(net, "cm_nets_config", None)
    return {"format": "cm-nets", "version": 1, **conf} if conf else None


SIGMA_BUCKETS = (0.1, 1.0, 10.0)  # edges of the per-σ loss breakdown in the logs


def _sigma_buckets(buckets: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Mean per-sample loss by noise level: σ < 0.1, 0.1–1, 1–10, ≥ 10."""
    if not buckets:
        return {}
    sigma = torch.cat([b[0] for b in buckets])
    loss = torch.cat([b[1] for b in buckets])
    index = torch.bucketize(sigma, torch.tensor(SIGMA_BUCKETS))
    names = ("loss_sigma_lt0.1", "loss_sigma_0.1-1", "loss_sigma_1-10", "loss_sigma_ge10")
    return {names[i]: float(loss[index == i].mean()) for i in range(len(names)) if (index == i).any()}


def _lr_at(cfg, step: int, total: int) -> float:
    o = cfg.optim
    scale = 1.0
    if o.warmup_steps:
        scale *= min(1.0, (step + 1) / o.warmup_steps)
    if o.decay == "cosine":
        horizon = o.decay_steps or total
        scale *= 0.5 * (1 + math.cos(math.pi * min(step, horizon) / horizon))
    elif o.decay == "inverse-sqrt":
        ref = o.decay_steps or 1
        scale /= math.sqrt(max(step / ref, 1.0))
    return o.lr * scale


def _objective_class(cfg: Config) -> type[cm_core.Objective]:
    try:
        return cm_core.get_objective(cfg.objective.name)
    except ValueError as exc:
        raise ConfigError(f"objective.name: {exc}") from None


def _target_rule(cfg: Config, cls: type[cm_core.Objective]) -> str | None:
    """The EMA rule of the target network θ⁻ (objective.target), or None: θ⁻ = stop-grad θ."""
    rule, name = cfg.objective.target, cfg.objective.name
    if rule == "none":
        return None
    if not cls.takes_target:
        raise ConfigError(
            f"objective.target = {rule!r}: objective {name!r} uses no target network (its target is the "
            "stop-gradient of the online network); set objective.target = \"none\""
        )
    if rule == "paper":
        if cls.target_rule is None:
            raise ConfigError(
                f"objective.target = \"paper\": the paper of objective {name!r} uses no EMA target network; "
                "set objective.target = \"none\" or a rule (ct, ct-openai, constant)"
            )
        return cls.target_rule
    return rule


def _make_objective(cfg: Config, teacher):
    name = cfg.objective.name
    cls = _objective_class(cfg)
    params = inspect.signature(cls).parameters
    kwargs = dict(cfg.objective.kwargs)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        renamed = {"metric": "distance", "c": "distance and huber_c"}.get(unknown[0])  # cm < 0.3 spellings
        hint = f" (renamed: use {renamed})" if renamed else ""
        raise ConfigError(
            f"objective.kwargs.{unknown[0]} is not an argument of {name!r}{hint}; valid: {sorted(params)} "
            "(a config's kwargs belong to its own objective: with another objective.name pass objective.kwargs={} "
            "or that objective's own)"
        )
    for key, value in cls.run_defaults(total_steps=cfg.run.total_steps).items():
        kwargs.setdefault(key, value)
    if cls.needs_teacher:
        if teacher is None:
            raise ConfigError(f"objective {name!r} needs a teacher: set model.teacher to a cm_nets checkpoint")
        kwargs["teacher"] = teacher
    for key in ("sigma_min", "sigma_data"):
        if key in params and key not in kwargs:
            kwargs[key] = getattr(cfg.model, key)
    try:
        objective = cls(**kwargs)
        if callable(getattr(objective, "num_scales", None)):
            objective.num_scales(0)  # a curriculum too short for total_steps fails now, not at step 0
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"objective {name!r}: {exc}") from None
    return objective


def _init_report(path: str, net: torch.nn.Module, src: torch.nn.Module, missing, unexpected) -> str:
    """What model.init loaded, and what it left out and why (one log line)."""
    total = len(net.state_dict())

    def names(keys) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    loaded = f"all {total}" if not missing else f"{total - len(missing)} of {total}"
    parts = [f"initialized from {path}: {loaded} tensors of this model"]
    if missing:
        parts.append(f"not in the file, so freshly initialized: {names(missing)}")
    if unexpected:
        parts.append(f"in the file but not in this model, left out: {names(unexpected)}")
    if "map_augment.weight" in unexpected:
        dim = src.state_dict()["map_augment.weight"].shape[1]
        parts.append(
            f"map_augment.weight is EDM's augmentation conditioning (augment_dim={dim}); this model has none, as "
            "ECT trains (--augment=0), and EDM's network skips map_augment without augment labels, so the model "
            "starts from the file's D(x, σ) unchanged"
        )
    return "; ".join(parts)


class Trainer:
    """Builds a run from its config — data, network, objective, TrainState, callbacks — and runs
    the loop (:meth:`train`). Built by :func:`run`."""

    def __init__(
        self,
        cfg: Config,
        *,
        objective=None,
        log=print,
        metrics: dict[str, Metric] | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        self.cfg = cfg
        self.log_fn = log
        self.info = distributed.init(cfg.run.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run.dir)
        if self.device.type == "cpu" or cfg.run.threads:
            ranks = threads.local_ranks() if self.info.world > 1 else 1
            count, why = threads.choose_threads(cfg.run.threads, ranks=ranks)
            torch.set_num_threads(count)
            self.say(f"cpu threads: {count} ({why})")
        if self.device.type == "cpu":  # reuse freed activation/gradient blocks instead of page-faulting fresh ones
            tuned = cm_kernels.tune_cpu_allocator()
            if tuned["applied"]:
                self.say(f"cpu allocator: {tuned['reason']}")
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.dataset = build_dataset(cfg.data, cfg.run.seed)
        world = self.info.world
        if cfg.run.batch_size % world:
            raise ConfigError(f"run.batch_size={cfg.run.batch_size} is not divisible by the {world} ranks")
        per_rank = cfg.run.batch_size // world
        micro = cfg.run.batch_per_rank or per_rank
        if per_rank % micro:
            raise ConfigError(f"run.batch_per_rank={micro} must divide the per-rank batch {per_rank}")
        stream = BatchStream(self.dataset, cfg.run.batch_size, self.info.rank, world, cfg.run.seed, cfg.data.hflip)
        self.metrics = {"loss": loss_metric, **(metrics or {})}
        best = cfg.checkpoint.best_metric
        if best and best not in self.metrics:
            raise ConfigError(
                f"checkpoint.best_metric = {best!r} is not known here (known: {', '.join(sorted(self.metrics))}); "
                "fd_digits comes with the cm command (`cm train`), which adds cm-eval's metrics"
            )

        if cfg.model.pipeline:
            net = _pipeline_net(cfg, self.dataset, self.say)
        else:
            net = self._preset_net(cfg)
        if cfg.model.init:
            src = cm_nets.load(cfg.model.init)
            try:
                missing, unexpected = net.load_state_dict(src.state_dict(), strict=False)
            except RuntimeError as exc:  # a shape mismatch: another architecture
                first = str(exc).strip().splitlines()[-1].strip()
                raise ConfigError(
                    f"model.init {cfg.model.init} does not fit model.preset {cfg.model.preset!r} with overrides "
                    f"{dict(cfg.model.overrides)}: {first}"
                ) from None
            self.say(_init_report(cfg.model.init, net, src, missing, unexpected))
        net = net.to(self.device)
        distributed.broadcast_(list(net.parameters()) + list(net.buffers()))  # rank 0's weights win
        self.name = cfg.objective.name
        self.kind = function_kind_of(self.name)
        self.f = build_function(self.name, net, cfg)
        teacher = None
        if cfg.model.teacher:
            tnet = cm_nets.load(cfg.model.teacher, map_location=self.device).eval().requires_grad_(False)
            teacher = cm_core.EDMDenoiser(tnet, cfg.model.sigma_data, cfg.model.teacher_c_noise)
        self.objective = objective if objective is not None else _make_objective(cfg, teacher)
        # What the objective declares: a given Objective speaks for itself; any other callable (a
        # wrapper) runs under the declarations of the configured objective.
        declared = type(self.objective) if isinstance(self.objective, cm_core.Objective) else _objective_class(cfg)
        self.target_rule = _target_rule(cfg, declared)
        target = None
        if self.target_rule is not None:
            target = copy.deepcopy(self.f).requires_grad_(False)
            self.objective.target = target
        # Trainable modules the objective adds (e.g. a learned loss weighting): optimized,
        # all-reduced and checkpointed with the network.
        extra = {k: m.to(self.device) for k, m in getattr(self.objective, "extra_modules", dict)().items()}
        for mod in extra.values():
            distributed.broadcast_(list(mod.parameters()) + list(mod.buffers()))

        o = cfg.optim
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[o.name]
        optimizer = opt_cls(trainable_params(net, extra), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        scaler = torch.amp.GradScaler(
            self.device.type, init_scale=cfg.precision.init_scale, enabled=cfg.precision.mode == "fp16"
        )
        emas = {e.name: EMA(e, net) for e in cfg.ema}
        if len(emas) != len(cfg.ema):
            raise ConfigError("ema entries need distinct names")
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        generator = torch.Generator(gen_device).manual_seed(cfg.run.seed * 7919 + self.info.rank)
        self.state = TrainState(net, emas, target, extra, optimizer, scaler, generator, stream)
        self.ctx = StepContext(
            objective=self.objective,
            model=torch.compile(self.f) if cfg.run.compile else self.f,
            device=self.device,
            micro=micro,
            accum=per_rank // micro,
            rank=self.info.rank,
            seed=cfg.run.seed,
            amp_dtype={"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision.mode],
            grad_clip=o.grad_clip,
            cond=self.cond,
            sync=distributed.GradSync(self.state.trainable(), cfg.run.grad_bucket_mb),
            target_decay=self._target_decay if target is not None else None,
        )
        self.log = MetricsLog(self.run_dir, cfg.log.tensorboard)
        self.callbacks: list[Callback] = []
        if cfg.log.progress:
            self.callbacks.append(ProgressBar())
        self.callbacks += [self.log, SampleGrids(cfg.log.sample_every)]
        if best:
            self.callbacks.append(BestCheckpoint(best, cfg.checkpoint.early_stop_patience))
        self.callbacks += list(callbacks)
        z_gen = torch.Generator().manual_seed(cfg.run.seed + 12345)
        # A latent model samples latents whatever the data hold (pixels are encoded per batch).
        sample_shape = getattr(net, "latent_shape", None) or tuple(self.dataset.sample_shape)
        shape = (min(cfg.log.sample_count, 256),) + tuple(sample_shape)
        self.fixed_noise = torch.randn(shape, generator=z_gen)
        # captions: the first prompts of the dataset; classes: 0, 1, 2, …
        self.fixed_labels = torch.arange(shape[0]) % max(getattr(self.dataset, "num_prompts", 0) or self.dataset.num_classes, 1)

    def _preset_net(self, cfg: Config) -> torch.nn.Module:
        overrides = dict(cfg.model.overrides)
        classes = self.dataset.num_classes if cfg.data.conditional else 0
        try:
            # size, channels and classes from the data unless model.overrides sets them (then they must fit)
            fitted, notes = cm_nets.fit_to_data(cfg.model.preset, tuple(self.dataset.sample_shape), classes, overrides)
            overrides = {**fitted, **overrides}
            net = cm_nets.create(cfg.model.preset, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from None
        if notes:
            self.say(f"model {cfg.model.preset} sized from the data: {', '.join(notes)}")
        return net

    # ---- what callbacks and metrics use ------------------------------------------------------
    @property
    def net(self) -> torch.nn.Module:
        return self.state.net

    def say(self, msg: str) -> None:
        if self.info.is_main:
            self.log_fn(f"[cm-train] {msg}")

    def cond(self, labels: torch.Tensor) -> dict:
        """The conditioning kwargs for a batch of labels: the dataset's own (captions: the prompts and
        SDXL's micro-conditioning), else class labels when the data are conditional."""
        hook = getattr(self.dataset, "conditioning", None)
        if hook is not None:
            return hook(labels)
        return {"class_labels": labels.to(self.device)} if self.cfg.data.conditional else {}

    def sampling_function(self) -> torch.nn.Module:
        """What sample grids and evaluations use: the first EMA (else the online net), wrapped for
        sampling (model.sample_boundary / sample_sigma_min)."""
        net = next(iter(self.state.emas.values())).net if self.state.emas else self.state.net
        return build_function(self.name, net, self.cfg, sampling=True).eval()

    def checkpoint_path(self) -> Path:
        """Where the checkpoint of the current step is (or will be) written."""
        return self.run_dir / "checkpoints" / f"step-{self.state.step:08d}"

    @torch.no_grad()
    def sample_grid(self) -> list[Path]:
        if not self.info.is_main or self.fixed_noise.ndim != 4 or not len(self.fixed_noise):
            return []  # log.sample_count = 0: no grids
        f = self.sampling_function()
        z = self.fixed_noise.to(self.device)
        cond = self.cond(self.fixed_labels)
        out = []
        m = self.cfg.model
        if self.kind.name == "latent-consistency":  # LCM sampling; the VAE decodes the latents for the grid
            lcm = cm_core.get_sampler("lcm")
            gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
            emb = f.encode(**cond)
            latents = {f"{n}step": lcm(f, z, lcm.default_sigmas(n), generator=gen, **emb) for n in (1, 4)}
            runs = {tag: f.net.decode_latents(x) for tag, x in latents.items()}
        elif self.kind.name == "diffusion":
            heun = cm_core.get_sampler("heun")
            sig = heun.default_sigmas(sigma_min=m.sigma_min)  # EDM's 18 time steps: 35 NFE
            runs = {f"heun{heun.nfe(sig)}": heun(f, z, sig, **cond)}
        elif "onestep" not in self.kind.samplers:  # a kind with its own sampler (sCM, MeanFlow): 1 and 2 steps
            spec = cm_core.get_sampler(self.kind.default_sampler)
            gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
            runs = {f"{n}step": spec(f, z, spec.default_sigmas(n), generator=gen, **cond) for n in (1, 2)}
        else:
            onestep, multistep = cm_core.get_sampler("onestep"), cm_core.get_sampler("multistep")
            gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
            sigmas = list(m.sample_sigmas) or list(cm_core.ECT_TWO_STEP_SIGMAS)  # the recipe's, else ECT's 2-step
            runs = {"1step": onestep(f, z, onestep.default_sigmas(), **cond)}
            if len(sigmas) > 1:
                runs[f"{multistep.nfe(sigmas)}step"] = multistep(
                    f, z, sigmas, generator=gen, sigma_min=m.eval_sigma_min, renoise=m.sample_renoise, **cond
                )
        for tag, x in runs.items():
            path = self.run_dir / "samples" / f"step-{self.state.step:08d}-{tag}.png"
            write_png(path, make_grid(x), scale=max(1, 64 // x.shape[-1]))
            out.append(path)
        return out

    @torch.no_grad()
    def evaluate(self, last: dict) -> float | None:
        """The best-checkpoint metric (lower is better), computed on rank 0 and shared."""
        metric = self.metrics[self.cfg.checkpoint.best_metric]
        value = metric(self, last) if self.info.is_main else None
        return broadcast_value(value, self.device)

    # ---- checkpoints -------------------------------------------------------------------------
    def save(self, metrics: dict | None = None) -> Path | None:
        rng = self.state.rng_state(self.device)
        if torch.distributed.is_initialized():  # every rank's random streams (a collective)
            rngs = [None] * self.info.world
            torch.distributed.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        state = self.state.state_dict(rngs, self.info.world)
        path = None
        if self.info.is_main:
            best = self.state.best_path()
            path = save_checkpoint(
                self.run_dir,
                self.state.step,
                self.state.networks(_net_meta(self.state.net)),
                state,
                {
                    "metrics": metrics or {},
                    "objective": self.name,
                    "data": {
                        "sample_shape": list(self.dataset.sample_shape),
                        "num_classes": self.dataset.num_classes if self.cfg.data.conditional else 0,
                    },
                    "config": config_to_dict(self.cfg),  # the checkpoint alone rebuilds the model
                },
                keep_last=self.cfg.checkpoint.keep_last,
                protect=(best,) if best else (),
            )
            export = getattr(self.state.net, "save_lora", None)
            if export is not None:  # the newest LoRA in diffusers' format: pipeline.load_lora_weights(<run>/lora)
                export(self.run_dir / "lora")
        distributed.barrier()
        return path

    def _check_resume_config(self, ckpt: Path) -> None:
        """Refuse to resume ``ckpt`` under a config that changes the model, objective or data; other
        changes (run length, optimizer, ...) need run.allow_config_change = true and are logged."""
        try:
            saved = json.loads((ckpt / "meta.json").read_text()).get("config")
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            return
        fixed, asked = resume_changes(saved, self.cfg)
        if fixed:
            raise ConfigError(
                f"cannot resume {self.run_dir} with a changed {'; '.join(fixed)}: these define the model, its "
                "objective or its data; use another run.dir (or restore the values)"
            )
        if asked and not self.cfg.run.allow_config_change:
            raise ConfigError(
                f"resuming {self.run_dir} with a changed {'; '.join(asked)}: pass run.allow_config_change=true "
                "to continue with them (or restore the values, or use another run.dir)"
            )
        if asked:
            self.say(f"resuming with config changes (run.allow_config_change): {'; '.join(asked)}")

    def load(self, path: Path) -> None:
        networks, state, _ = load_checkpoint(path)
        self.state.load_networks(networks)
        if not self.state.load_state_dict(state, self.info.rank, self.info.world, self.device):
            self.say(
                f"checkpoint was written by {state['world']} ranks, now {self.info.world}: "
                "random streams restart (the run continues, but not bit-exactly)"
            )

    def checkpoint(self, last: dict) -> bool:
        """Let callbacks evaluate (the best metric), save, tell them; True when a callback asks to stop."""
        metrics = dict(last)
        stop = [cb.on_checkpoint(self, metrics) for cb in self.callbacks]
        path = self.save(metrics)
        for cb in self.callbacks:
            cb.on_saved(self, path)
        return any(stop)

    # ---- the divergence guard ----------------------------------------------------------------
    # Below this fp16 loss scale, an overflow is no longer the scaler probing upward: the gradients
    # themselves are not finite, and the divergence guard counts it.
    SCALE_FLOOR = 1.0

    def _normal_overflow(self, step: int, result) -> bool:
        """An fp16 gradient overflow with a finite loss: GradScaler lowers the scale and the step is
        skipped, as it is designed to; not divergence while the scale stays >= SCALE_FLOOR."""
        if not result.overflow:
            return False
        scale = self.state.scaler.get_scale()  # already lowered by this step's update
        if scale < self.SCALE_FLOOR:
            return False
        self._overflows = getattr(self, "_overflows", 0) + 1
        if self._overflows <= 10 or self._overflows % 100 == 0:
            self.say(f"step {step}: fp16 gradient overflow, step skipped, loss scale lowered to {scale:g} "
                     f"({self._overflows} so far; normal while the scale settles)")  # fmt: skip
        return True

    def _guard(self, step: int) -> bool:
        """Record a skipped, non-finite step; True when it triggered a rollback."""
        g, state = self.cfg.guard, self.state
        state.bad_steps = [s for s in state.bad_steps if s > step - g.window] + [step]
        self.say(f"step {step}: non-finite loss or gradient, step skipped")
        if len(state.bad_steps) <= g.max_bad_steps:
            return False
        self.rollback()
        return True

    def rollback(self) -> None:
        state = self.state
        ckpt = usable_checkpoint(self.run_dir, say=self.say)
        if ckpt is None:
            raise DivergenceError(f"non-finite losses at steps {state.bad_steps} and no checkpoint to roll back to")
        state.rollbacks += 1
        if state.rollbacks > self.cfg.guard.max_rollbacks:
            raise DivergenceError(
                f"training diverged again after {self.cfg.guard.max_rollbacks} rollbacks "
                f"(non-finite values at steps {state.bad_steps}); lower optim.lr or use bf16"
            )
        rollbacks, factor = state.rollbacks, state.lr_factor * self.cfg.guard.lr_factor
        scale = state.scaler.get_scale() if state.scaler.is_enabled() else None
        self.load(ckpt)
        if scale is not None and state.scaler.get_scale() > scale:  # keep the scale the run has learnt
            state.scaler.update(new_scale=scale)
        state.rollbacks, state.lr_factor, state.bad_steps = rollbacks, factor, []
        self.say(f"rolled back to {ckpt.name} after repeated non-finite steps; LR × {state.lr_factor:g}")

    def _target_decay(self, step: int) -> float:
        """μ of the target network θ⁻ at ``step``, by objective.target's rule."""
        o = self.cfg.objective
        if self.target_rule == "constant":
            return o.target_decay
        variant = "openai" if self.target_rule == "ct-openai" else "paper"
        return cm_core.ct_target_ema(step, self.cfg.run.total_steps, o.ct_s0, o.ct_s1, o.target_decay, variant=variant)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        self._resumed_at = None
        if cfg.run.resume and (ckpt := usable_checkpoint(self.run_dir, say=self.say)) is not None:
            self._check_resume_config(ckpt)
            self.load(ckpt)
            self._resumed_at = state.step
            self.say(f"resumed from {ckpt} at step {state.step}")
        if self.info.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        for cb in self.callbacks:
            cb.on_train_start(self)
        with _StopSignals() as stop:
            last = self._loop(stop)
        return self._finish(last)

    def _stop_requested(self, stop: _StopSignals) -> str | None:
        """The signal that asked to stop, agreed by all ranks (any rank's signal stops every rank).
        One rank checks after every step; several agree every 10 steps (a small all-reduce), well
        within the minutes of notice a scheduler gives."""
        code = stop.NAMES.index(stop.signame) + 1 if stop.signame else 0
        if self.info.world > 1:
            if self.state.step % 10:
                return None
            code = int(distributed.max_scalar(float(code), self.device))
        return stop.NAMES[code - 1] if code else None

    def _loop(self, stop: _StopSignals) -> dict:
        """Train to run.total_steps (or an early stop); the last logged record."""
        cfg, state = self.cfg, self.state
        total = cfg.run.total_steps
        t_last, n_last, last = time.time(), state.step, {}
        sigma_loss: list[tuple[torch.Tensor, torch.Tensor]] = []  # (σ, loss) per sample since the last log line
        while state.step < total:
            step = state.step
            lr = _lr_at(cfg, step, total) * state.lr_factor
            result = train_step(state, state.stream.next(), self.ctx, lr)
            if step == 0 and self.ctx.sync.buckets:
                sync = self.ctx.sync
                self.say(
                    f"gradient all-reduce over {self.info.world} ranks: {len(sync.buckets)} bucket(s) of <= "
                    f"{cfg.run.grad_bucket_mb:g} MB, {sync.overlapped} started during backward"
                )
            if not result.finite and not self._normal_overflow(step, result) and self._guard(step):
                continue
            sigma_loss += result.sigma_loss
            record = None
            if state.step % cfg.log.every == 0 or state.step == total:
                rate = (state.step - n_last) / max(time.time() - t_last, 1e-9)
                last = record = {
                    "step": state.step,
                    "loss": distributed.mean_scalar(float(result.loss), self.device) if result.finite else None,
                    "grad_norm": float(result.grad_norm) if result.finite else None,
                    "lr": lr,
                    "it_per_s": rate,
                    "img_per_s": rate * cfg.run.batch_size,
                    **{f"ema_{k}": v for k, v in result.decays.items()},
                    **result.stats,
                    **_sigma_buckets(sigma_loss),  # this rank's samples since the last log line
                }
                sigma_loss.clear()
                t_last, n_last = time.time(), state.step
            for cb in self.callbacks:
                cb.on_step_end(self, result, record)
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < total:
                if self.checkpoint(last):
                    self.say(
                        f"early stop at step {state.step}: no improvement in "
                        f"{cfg.checkpoint.early_stop_patience} evaluations; best {state.best}"
                    )
                    break
            if (signame := self._stop_requested(stop)) is not None:
                done = latest_checkpoint(self.run_dir)  # just saved at this step: do not write it twice
                path = done if done is not None and done.name == f"step-{state.step:08d}" else self.save(last)
                self.say(f"{signame} received: checkpoint {path} committed at step {state.step}")
                raise Interrupted(signame, state.step, path)
        return last

    def _finish(self, last: dict) -> dict:
        cfg, state = self.cfg, self.state
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self._resumed_at == state.step:  # a finished run run again: its checkpoints stay as they are
            final = latest_checkpoint(self.run_dir)
            self.say(f"already at step {state.step} of {cfg.run.total_steps}: nothing to train, checkpoints kept")
            return {"step": state.step, "checkpoint": str(final) if final else None, "metrics": last, "samples": []}
        if cfg.checkpoint.best_metric:
            self.checkpoint(last)
            final = latest_checkpoint(self.run_dir)
        else:
            final = self.save(last)
        grids = self.sample_grid()
        self.say(f"done: {state.step} steps; checkpoint {final}; samples {[str(g) for g in grids]}")
        return {
            "step": state.step,
            "checkpoint": str(final) if final else None,
            "metrics": last,
            "samples": [str(g) for g in grids],
        }


def run(
    config: Config,
    *,
    objective=None,
    log=print,
    metrics: dict[str, Metric] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train as the config says; returns the final step, checkpoint path and last metrics.

    ``objective``: an objective instance instead of ``config.objective``; ``metrics``: best-checkpoint
    metrics beyond "loss" by name (``checkpoint.best_metric``); ``callbacks``: more :class:`Callback`s."""
    before = torch.get_num_threads()  # the Trainer sets the run's thread count; the caller gets theirs back
    try:
        trainer = Trainer(config, objective=objective, log=log, metrics=metrics, callbacks=callbacks)
        return trainer.train()
    finally:
        torch.set_num_threads(before)
        distributed.shutdown()
