"""The training loop: one straight path from a batch to an optimizer step, for 1 rank or many.

run(config)  →  data → objective(f, x0, step=k) → backward → all-reduce → guard → step → EMA
                → logs, sample grids, atomic checkpoints; resume continues bit-exactly.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import sys
import time
from pathlib import Path

import cm_core
import cm_nets
import torch

from . import distributed
from .checkpoint import atomic_write_text, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, config_to_dict
from .data import BatchStream, build_dataset
from .images import make_grid, write_png

__all__ = ["run", "build_function", "function_kind_of", "Trainer", "DivergenceError"]


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


def _net_meta(net: torch.nn.Module) -> dict | None:
    conf = getattr(net, "cm_nets_config", None)
    return {"format": "cm-nets", "version": 1, **conf} if conf else None


class EMA:
    """A shadow copy of the network's weights: constant decay or EDM2's power function."""

    def __init__(self, cfg, net: torch.nn.Module):
        self.cfg = cfg
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.gamma = cm_core.sigma_rel_to_gamma(cfg.sigma_rel) if cfg.kind == "power" else None

    def decay(self, step: int) -> float:
        return cm_core.power_function_ema(step, self.gamma) if self.gamma is not None else self.cfg.decay

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> float:
        beta = self.decay(step)
        cm_core.ema_update_(self.net.parameters(), net.parameters(), beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)
        return beta


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
            f"objective.kwargs.{unknown[0]} is not an argument of {name!r}{hint}; valid: {sorted(params)}"
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
    """Holds the run's state; ``train()`` is the loop. Built by :func:`run`."""

    def __init__(self, cfg: Config, *, objective=None, log=print):
        self.cfg = cfg
        self.log_fn = log
        self.info = distributed.init(cfg.run.device)
        self.device = self.info.device
        self.run_dir = Path(cfg.run.dir)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.dataset = build_dataset(cfg.data, cfg.run.seed)
        world = self.info.world
        if cfg.run.batch_size % world:
            raise ConfigError(f"run.batch_size={cfg.run.batch_size} is not divisible by the {world} ranks")
        per_rank = cfg.run.batch_size // world
        micro = cfg.run.batch_per_rank or per_rank
        if per_rank % micro:
            raise ConfigError(f"run.batch_per_rank={micro} must divide the per-rank batch {per_rank}")
        self.micro, self.accum = micro, per_rank // micro
        self.stream = BatchStream(self.dataset, cfg.run.batch_size, self.info.rank, world, cfg.run.seed, cfg.data.hflip)

        overrides = dict(cfg.model.overrides)
        try:
            net = cm_nets.create(cfg.model.preset, **overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model: {exc}") from None
        if cfg.model.init:
            src = cm_nets.load(cfg.model.init)
            try:
                missing, unexpected = net.load_state_dict(src.state_dict(), strict=False)
            except RuntimeError as exc:  # a shape mismatch: another architecture
                first = str(exc).strip().splitlines()[-1].strip()
                raise ConfigError(
                    f"model.init {cfg.model.init} does not fit model.preset {cfg.model.preset!r} with overrides "
                    f"{overrides}: {first}"
                ) from None
            self._say(_init_report(cfg.model.init, net, src, missing, unexpected))
        self.net = net.to(self.device)
        distributed.broadcast_(list(self.net.parameters()) + list(self.net.buffers()))  # rank 0's weights win
        self.name = cfg.objective.name
        self.kind = function_kind_of(self.name)
        self.f = build_function(self.name, self.net, cfg)
        teacher = None
        if cfg.model.teacher:
            tnet = cm_nets.load(cfg.model.teacher, map_location=self.device).eval().requires_grad_(False)
            teacher = cm_core.EDMDenoiser(tnet, cfg.model.sigma_data, cfg.model.teacher_c_noise)
        self.objective = objective if objective is not None else _make_objective(cfg, teacher)
        # What the objective declares: a given Objective speaks for itself; any other callable (a
        # wrapper) runs under the declarations of the configured objective.
        declared = type(self.objective) if isinstance(self.objective, cm_core.Objective) else _objective_class(cfg)
        self.target_rule = _target_rule(cfg, declared)
        self.target = None
        if self.target_rule is not None:
            self.target = copy.deepcopy(self.f).requires_grad_(False)
            self.objective.target = self.target
        # Trainable modules the objective adds (e.g. a learned loss weighting): optimized,
        # all-reduced and checkpointed with the network.
        extra_modules = getattr(self.objective, "extra_modules", dict)
        self.extra = {k: m.to(self.device) for k, m in extra_modules().items()}
        for mod in self.extra.values():
            distributed.broadcast_(list(mod.parameters()) + list(mod.buffers()))
        self.model = torch.compile(self.f) if cfg.run.compile else self.f

        o = cfg.optim
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[o.name]
        self.optimizer = opt_cls(
            self._trainable(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision.mode]
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=cfg.precision.init_scale, enabled=cfg.precision.mode == "fp16"
        )
        self.emas = {e.name: EMA(e, self.net) for e in cfg.ema}
        if len(self.emas) != len(cfg.ema):
            raise ConfigError("ema entries need distinct names")
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        self.generator = torch.Generator(gen_device).manual_seed(cfg.run.seed * 7919 + self.info.rank)
        self.step = 0
        self.lr_factor = 1.0
        self.bad_steps: list[int] = []
        self.rollbacks = 0
        self.best: tuple[float, str] | None = None
        self.evals_without_improvement = 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._tb = None  # TensorBoard writer, created on first use when log.tensorboard is set
        z_gen = torch.Generator().manual_seed(cfg.run.seed + 12345)
        shape = (min(cfg.log.sample_count, 256),) + tuple(self.dataset.sample_shape)
        self.fixed_noise = torch.randn(shape, generator=z_gen)
        self.fixed_labels = torch.arange(shape[0]) % max(self.dataset.num_classes, 1)

    # ---- helpers ---------------------------------------------------------------------------
    def _trainable(self) -> list[torch.nn.Parameter]:
        """The network's parameters, then the objective's extra modules' (a fixed order)."""
        mods = [self.net, *self.extra.values()]
        return [p for mod in mods for p in mod.parameters() if p.requires_grad]

    def _say(self, msg: str) -> None:
        if self.info.is_main:
            self.log_fn(f"[cm-train] {msg}")

    def _cond(self, labels: torch.Tensor) -> dict:
        return {"class_labels": labels.to(self.device)} if self.cfg.data.conditional else {}

    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state(), "generator": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state_dict(self) -> dict:
        rng = self._rng_state()
        if torch.distributed.is_initialized():
            gathered = [None] * self.info.world
            torch.distributed.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "stream": self.stream.state_dict(),
            "rng": gathered,
            "world": self.info.world,
            "lr_factor": self.lr_factor,
            "bad_steps": list(self.bad_steps),
            "rollbacks": self.rollbacks,
            "best": list(self.best) if self.best else [],
            "evals_without_improvement": self.evals_without_improvement,
        }

    def save(self, metrics: dict | None = None) -> Path | None:
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        path = None
        if self.info.is_main:
            meta = _net_meta(self.net)
            networks = {"net": (self.net.state_dict(), meta)}
            for name, ema in self.emas.items():
                networks[f"ema-{name}"] = (ema.net.state_dict(), meta)
            if self.target is not None:
                networks["target"] = (self.target.net.state_dict(), meta)
            for name, mod in self.extra.items():
                networks[f"extra-{name}"] = (mod.state_dict(), None)
            protect = (Path(self.best[1]),) if self.best and self.best[1] else ()
            path = save_checkpoint(
                self.run_dir,
                self.step,
                networks,
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
                protect=protect,
            )
        distributed.barrier()
        return path

    def load(self, path: Path) -> None:
        networks, state, meta = load_checkpoint(path)
        self.net.load_state_dict(networks["net"])
        for name, ema in self.emas.items():
            key = f"ema-{name}"
            if key in networks:
                ema.net.load_state_dict(networks[key])
        if self.target is not None and "target" in networks:
            self.target.net.load_state_dict(networks["target"])
        for name, mod in self.extra.items():
            mod.load_state_dict(networks[f"extra-{name}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.lr_factor = float(state["lr_factor"])
        self.bad_steps = [int(s) for s in state["bad_steps"]]
        self.rollbacks = int(state["rollbacks"])
        self.best = (float(state["best"][0]), str(state["best"][1])) if state["best"] else None
        self.evals_without_improvement = int(state["evals_without_improvement"])
        rngs = state["rng"]
        if int(state["world"]) == self.info.world:
            mine = rngs[self.info.rank]
            torch.set_rng_state(mine["cpu"])
            self.generator.set_state(mine["generator"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self._say(
                f"checkpoint was written by {state['world']} ranks, now {self.info.world}: "
                "random streams restart (the run continues, but not bit-exactly)"
            )

    def write_metrics(self, record: dict) -> None:
        if not self.info.is_main:
            return
        if self.cfg.log.tensorboard:
            if self._tb is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
                except ImportError:
                    self._say(
                        "log.tensorboard = true but tensorboard is not installed (pip install tensorboard); "
                        "metrics go to metrics.jsonl only"
                    )
                    self._tb = False
            if self._tb:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tb.add_scalar(key, value, record["step"])
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _eval_function(self) -> torch.nn.Module:
        """What sample grids and evaluations use: the first EMA (else the online net), wrapped for
        sampling (model.sample_boundary / sample_sigma_min)."""
        net = next(iter(self.emas.values())).net if self.emas else self.net
        return build_function(self.name, net, self.cfg, sampling=True).eval()

    @torch.no_grad()
    def sample_grid(self) -> list[Path]:
        if not self.info.is_main or self.fixed_noise.ndim != 4:
            return []
        f = self._eval_function()
        z = self.fixed_noise.to(self.device)
        cond = self._cond(self.fixed_labels)
        out = []
        if self.kind.name == "diffusion":
            sig = cm_core.edm_sampling_sigmas(18, self.cfg.model.sigma_min)
            runs = {"heun35": cm_core.solve(f, z * sig[0].item(), sig, **cond)}
        else:
            m = self.cfg.model
            gen = torch.Generator().manual_seed(self.cfg.run.seed + 1)
            sigmas = list(m.sample_sigmas) or [80.0, 0.821]  # ECT's 2-step σ's unless the recipe names its own
            runs = {"1step": cm_core.onestep_sample(f, z, **cond)}
            if len(sigmas) > 1:
                runs[f"{len(sigmas)}step"] = cm_core.multistep_sample(
                    f, z, sigmas, generator=gen, sigma_min=m.eval_sigma_min, renoise=m.sample_renoise, **cond
                )
        for tag, x in runs.items():
            path = self.run_dir / "samples" / f"step-{self.step:08d}-{tag}.png"
            write_png(path, make_grid(x), scale=max(1, 64 // x.shape[-1]))
            out.append(path)
        return out

    @torch.no_grad()
    def evaluate(self, last: dict) -> float | None:
        """The configured best-checkpoint metric (lower is better), computed on rank 0 and shared."""
        kind = self.cfg.checkpoint.best_metric
        value = float("nan")
        if kind == "loss":
            value = last.get("loss") if last.get("loss") is not None else float("nan")
        elif kind == "fd_digits" and self.info.is_main:
            try:
                import cm_eval
            except ImportError:
                raise ConfigError(
                    "checkpoint.best_metric = 'fd_digits' needs cm-eval (pip install -e packages/cm-eval)"
                ) from None
            f = self._eval_function()
            n = self.cfg.checkpoint.eval_count
            gen = torch.Generator().manual_seed(self.cfg.run.seed + 777)
            z = torch.randn((n,) + tuple(self.dataset.sample_shape), generator=gen).to(self.device)
            labels = torch.arange(n) % max(self.dataset.num_classes, 1)
            x = torch.cat(
                [
                    cm_core.onestep_sample(f, zc, **self._cond(lc)).cpu()
                    for zc, lc in zip(z.split(256), labels.split(256))
                ]
            )
            value = cm_eval.fd_digits(x.clamp(-1, 1))
        if torch.distributed.is_initialized():
            t = torch.tensor([value], dtype=torch.float64, device=self.device)
            torch.distributed.broadcast(t, 0)
            value = t.item()
        return value if value == value else None

    def _track_best(self, value: float | None, path: Path) -> tuple[bool, bool]:
        """Record an evaluation of the checkpoint about to be written at ``path``: (improved, stop)."""
        if value is None:
            return False, False
        metric = self.cfg.checkpoint.best_metric
        if self.best is None or value < self.best[0]:
            self.best = (value, str(path))
            self.evals_without_improvement = 0
            self._say(f"step {self.step}: {metric} = {value:.4g} (new best)")
            return True, False
        self.evals_without_improvement += 1
        self._say(
            f"step {self.step}: {metric} = {value:.4g} "
            f"(best {self.best[0]:.4g}, {self.evals_without_improvement} without improvement)"
        )
        patience = self.cfg.checkpoint.early_stop_patience
        return False, bool(patience) and self.evals_without_improvement >= patience

    def checkpoint(self, last: dict) -> bool:
        """Evaluate (when configured), save, keep the best; True when training should stop early."""
        value = self.evaluate(last) if self.cfg.checkpoint.best_metric else None
        # Decide first, so the saved state already knows whether it is the best checkpoint.
        improved, stop = self._track_best(value, self.run_dir / "checkpoints" / f"step-{self.step:08d}")
        metric = self.cfg.checkpoint.best_metric
        path = self.save(dict(last, **({metric: value} if value is not None else {})))
        if improved and self.info.is_main:
            record = {"metric": metric, "value": value, "step": self.step, "checkpoint": str(path)}
            atomic_write_text(self.run_dir / "best.json", json.dumps(record, indent=2) + "\n")
        return stop

    def rollback(self) -> None:
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            raise DivergenceError(f"non-finite losses at steps {self.bad_steps} and no checkpoint to roll back to")
        self.rollbacks += 1
        if self.rollbacks > self.cfg.guard.max_rollbacks:
            raise DivergenceError(
                f"training diverged again after {self.cfg.guard.max_rollbacks} rollbacks "
                f"(non-finite values at steps {self.bad_steps}); lower optim.lr or use bf16"
            )
        rollbacks, factor = self.rollbacks, self.lr_factor * self.cfg.guard.lr_factor
        self.load(ckpts[-1])
        self.rollbacks, self.lr_factor, self.bad_steps = rollbacks, factor, []
        self._say(f"rolled back to {ckpts[-1].name} after repeated non-finite steps; LR × {self.lr_factor:g}")

    def _seed_chunk(self, step: int, chunk: int) -> None:
        """Every random draw of a micro-batch is a function of (seed, step, chunk of the global batch).

        So the run does not depend on how the global batch is spread over ranks: 2 ranks × 1 chunk
        draw exactly what 1 rank × 2 accumulated chunks draws (same noise, σ and dropout masks).
        """
        key = ((self.cfg.run.seed * 1_000_003 + step) * 4_099 + chunk) % (2**62)
        self.generator.manual_seed(key)
        torch.manual_seed(key ^ 0x5DEECE66D)  # dropout (and any other global-RNG use), all devices

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        if cfg.run.resume and (ckpt := latest_checkpoint(self.run_dir)) is not None:
            self.load(ckpt)
            self._say(f"resumed from {ckpt} at step {self.step}")
        if self.info.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
        total = cfg.run.total_steps
        bar = None
        if self.info.is_main and cfg.log.progress:
            try:
                from tqdm import tqdm

                bar = tqdm(
                    total=total,
                    initial=self.step,
                    desc=f"{self.name}",
                    unit="it",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    disable=None,
                )
            except ImportError:
                bar = None
        params = self._trainable()
        t_last, n_last, last = time.time(), self.step, {}
        by_sigma: list[tuple[torch.Tensor, torch.Tensor]] = []  # (σ, loss) per sample, for the log
        while self.step < total:
            step = self.step
            lr = _lr_at(cfg, step, total) * self.lr_factor
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            x, y = self.stream.next()
            loss_sum, stats = 0.0, {}
            for i in range(self.accum):
                xs = x[i * self.micro : (i + 1) * self.micro].to(self.device)
                ys = y[i * self.micro : (i + 1) * self.micro]
                self._seed_chunk(step, self.info.rank * self.accum + i)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    per_sample, stats = self.objective(
                        self.model, xs, step=step, generator=self.generator, **self._cond(ys)
                    )
                    loss = per_sample.float().mean() / self.accum
                sigma = stats.pop("per_sample_sigma", None)
                if sigma is not None:
                    by_sigma.append((sigma.float().cpu(), per_sample.detach().float().cpu()))
                self.scaler.scale(loss).backward()
                loss_sum += loss.detach()
            grads = [p.grad for p in params if p.grad is not None]
            distributed.all_reduce_mean_(grads)
            self.scaler.unscale_(self.optimizer)
            # Total norm, clipped in the same pass when asked (max_norm = inf leaves grads alone).
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip) if grads else torch.zeros(())
            finite = bool(torch.isfinite(torch.as_tensor(loss_sum)).item()) and bool(torch.isfinite(grad_norm).item())
            finite = distributed.all_finite(finite, self.device)
            if finite:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                decays = {name: ema.update(self.net, self.step) for name, ema in self.emas.items()}
                if self.target is not None:
                    decays["target"] = self._update_target(step)
            else:
                self.scaler.update()  # lowers the fp16 loss scale after an overflow
                self.bad_steps = [s for s in self.bad_steps if s > step - cfg.guard.window] + [step]
                self._say(f"step {step}: non-finite loss or gradient, step skipped")
                self.step += 1  # the data and RNG moved on; the weights did not
                if len(self.bad_steps) > cfg.guard.max_bad_steps:
                    self.rollback()
                    continue
                decays = {}
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log.every == 0 or self.step == total:
                dt = max(time.time() - t_last, 1e-9)
                rate = (self.step - n_last) / dt
                last = {
                    "step": self.step,
                    "loss": distributed.mean_scalar(float(loss_sum), self.device) if finite else None,
                    "grad_norm": float(grad_norm) if finite else None,
                    "lr": lr,
                    "it_per_s": rate,
                    "img_per_s": rate * cfg.run.batch_size,
                    **{f"ema_{k}": v for k, v in decays.items()},
                    **{k: v for k, v in stats.items()},
                    **_sigma_buckets(by_sigma),  # this rank's samples since the last log line
                }
                by_sigma.clear()
                self.write_metrics(last)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{last['loss']:.4g}" if last["loss"] is not None else "nan",
                        img_s=f"{last['img_per_s']:.0f}",
                    )
                t_last, n_last = time.time(), self.step
            if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                self.sample_grid()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                if self.checkpoint(last):
                    self._say(
                        f"early stop at step {self.step}: no improvement in "
                        f"{cfg.checkpoint.early_stop_patience} evaluations; best {self.best}"
                    )
                    break
        if bar is not None:
            bar.close()
        if cfg.checkpoint.best_metric:
            self.checkpoint(last)
            final = latest_checkpoint(self.run_dir)
        else:
            final = self.save(last)
        grids = self.sample_grid()
        self._say(f"done: {self.step} steps; checkpoint {final}; samples {[str(g) for g in grids]}")
        return {
            "step": self.step,
            "checkpoint": str(final) if final else None,
            "metrics": last,
            "samples": [str(g) for g in grids],
        }

    def _update_target(self, step: int) -> float:
        o = self.cfg.objective
        if self.target_rule == "constant":
            mu = o.target_decay
        else:
            mu = cm_core.ct_target_ema(
                step,
                self.cfg.run.total_steps,
                o.ct_s0,
                o.ct_s1,
                o.target_decay,
                variant="openai" if self.target_rule == "ct-openai" else "paper",
            )
        cm_core.ema_update_(self.target.net.parameters(), self.net.parameters(), mu)
        return mu


def run(config: Config, *, objective=None, log=print) -> dict:
    """Train as the config says; returns the final step, checkpoint path and last metrics."""
    trainer = Trainer(config, objective=objective, log=log)
    try:
        return trainer.train()
    finally:
        distributed.shutdown()
