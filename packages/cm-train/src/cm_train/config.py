"""The training configuration: typed dataclasses loaded from TOML (or YAML) with dotted overrides.

Unknown keys and wrong types are errors that name the key and the valid choices, so a typo in
a cluster job fails in the first second instead of after the queue wait.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Config",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PrecisionConfig",
    "EMAConfig",
    "CheckpointConfig",
    "LogConfig",
    "GuardConfig",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "resume_changes",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what would be valid."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: checkpoints, logs, samples, the resolved config
    seed: int = 0
    total_steps: int = 1000
    batch_size: int = 64  # global batch, fixed whatever the number of ranks
    batch_per_rank: int = 0  # 0: global batch / ranks; smaller values add gradient accumulation
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (opt-in)
    grad_bucket_mb: float = 25.0  # gradient all-reduce buckets (MB), launched during backward as they fill
    resume: bool = True  # continue from the run folder's latest checkpoint when there is one
    allow_config_change: bool = False  # resume although run length, optimizer, ... changed (logged)
    threads: int = 0  # CPU threads; 0: OMP_NUM_THREADS, else the free cores (cm_train.threads); 1 is bit-exact


@dataclass
class DataConfig:
    source: str = "digits"  # digits | gmm | folder | zip | npz | captions | latents (cm_train.captions)
    path: str = ""  # folder / zip / npz / caption folder or manifest / latent cache (not used by the built-in sources)
    resolution: int = 0  # resize images to this size (0: keep; captions: the square crop); digits are 8×8 natively
    channels: int = 0  # 0: keep; 1 or 3 converts
    hflip: bool = False  # random horizontal flip
    conditional: bool = False  # pass class labels to the network
    num_classes: int = 0  # filled from the dataset when 0
    gmm_components: int = 4  # the built-in Gaussian-mixture toy data (source = "gmm")
    gmm_dim: int = 2


@dataclass
class ModelConfig:
    preset: str = "unet-tiny"  # a cm_nets preset
    overrides: dict = field(default_factory=dict)  # constructor arguments of the preset
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    c_noise: str = "edm"  # edm | openai | trig (TrigFlow: c = t; with edm, sCM reads the net as EDM's raw network)
    boundary: str = "shifted"  # shifted | edm: the training scalings (ECT trains with the plain EDM ones)
    init: str = ""  # weights to start from (cm_nets checkpoint), e.g. an iCT model for BCM
    teacher: str = ""  # teacher cm_nets checkpoint (CD, ECT from a diffusion model, Direct CM)
    teacher_c_noise: str = "edm"
    # A local diffusers Stable Diffusion pipeline folder (SD 1.5 / SDXL layout) instead of a preset: its
    # UNet is the network (text-to-image objectives "lcm", "latent-direct-cm"), trained as LoRA; the
    # base model, with the adapters off, is the teacher.
    pipeline: str = ""
    pipeline_dtype: str = "fp32"  # fp32 | fp16 | bf16: the frozen UNet/text encoders (LoRA stays fp32)
    lora: dict = field(default_factory=dict)  # rank, alpha (= rank), targets (LCM-LoRA's), dropout
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward (SDXL at 1024 px)
    # How the trained function samples (sample grids, best-checkpoint metric, load_trained, `cm sample`,
    # `cm eval`); the defaults repeat the training choices. ECT evaluates with the shifted boundary
    # at σ_min = 0.003, re-noises with σ·ε and takes 2 steps through σ = 0.821.
    sample_boundary: str = ""  # "" (= boundary) | shifted | edm
    sample_sigma_min: float = 0.0  # 0 = sigma_min
    sample_renoise: str = "cm"  # cm: √(σ² − σ_min²)·ε (CM Algorithm 1) | ect: σ·ε
    sample_sigmas: tuple = ()  # the recipe's multistep σ list, e.g. [80.0, 0.821]; () = the Karras grid

    @property
    def eval_boundary(self) -> str:
        """The boundary condition the trained function samples with."""
        return self.sample_boundary or self.boundary

    @property
    def eval_sigma_min(self) -> float:
        """The σ_min the trained function samples with (its boundary f(x, σ_min) = x when shifted)."""
        return self.sample_sigma_min or self.sigma_min


@dataclass
class ObjectiveConfig:
    name: str = "ict"  # an objective name: built in, registered, or a cm.objectives plugin
    kwargs: dict = field(default_factory=dict)  # its constructor arguments (run-dependent ones filled in)
    # An EMA target network θ⁻ for objectives that take one: none (θ⁻ = stop-grad θ) | paper (the
    # objective's own rule: CT's μ(N(k)), CD's constant μ) | ct | ct-openai | constant
    target: str = "none"
    target_decay: float = 0.95  # target = "constant" (CD's μ)
    ct_s0: int = 2  # CT curriculum for target = "ct": μ(k) from N(k)
    ct_s1: int = 150


@dataclass
class OptimConfig:
    name: str = "radam"  # adam | adamw | radam
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up from 0
    decay: str = "none"  # none | cosine | inverse-sqrt
    decay_steps: int = 0  # inverse-sqrt reference step (EDM2's t_ref), cosine horizon (0: total)
    grad_clip: float = 0.0  # max global grad norm (0: off)


@dataclass
class PrecisionConfig:
    mode: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses dynamic loss scaling)
    init_scale: float = 2.0**16


@dataclass
class EMAConfig:
    kind: str = "constant"  # constant | power (EDM2's power-function EMA)
    decay: float = 0.9999  # kind = constant
    sigma_rel: float = 0.05  # kind = power
    name: str = "ema"


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep_last: int = 3
    best_metric: str = ""  # "" | loss | fd_digits (with `cm train`) | a metric given to cm_train.run: lowest kept as best
    eval_count: int = 1000  # samples for fd_digits (1-step, first EMA, fixed noise)
    early_stop_patience: int = 0  # evaluations without improvement before stopping (0: never)


@dataclass
class LogConfig:
    every: int = 50  # steps between JSONL metric lines
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    sample_count: int = 64
    progress: bool = True  # a progress bar on rank 0
    tensorboard: bool = False


@dataclass
class GuardConfig:
    max_bad_steps: int = 5  # non-finite steps within `window` before rolling back
    window: int = 100
    lr_factor: float = 0.5  # LR multiplier after a rollback
    max_rollbacks: int = 3


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    ema: list = field(default_factory=lambda: [EMAConfig()])
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.source": ("digits", "gmm", "folder", "zip", "npz", "captions", "latents"),
    "model.c_noise": ("edm", "openai", "trig"),
    "model.teacher_c_noise": ("edm", "openai"),
    "model.boundary": ("shifted", "edm"),
    "model.pipeline_dtype": ("fp32", "fp16", "bf16"),
    "model.sample_boundary": ("", "shifted", "edm"),
    "model.sample_renoise": ("cm", "ect"),
    "optim.name": ("adam", "adamw", "radam"),
    "optim.decay": ("none", "cosine", "inverse-sqrt"),
    "precision.mode": ("fp32", "bf16", "fp16"),
    "ema.kind": ("constant", "power"),
    "objective.target": ("none", "paper", "ct", "ct-openai", "constant"),
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert one leaf value against its declared type."""
    target = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "tuple": tuple}.get(
        annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""), None
    )
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if target is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if target is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if target is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table of key = value pairs, got {value!r}")
        return dict(value)
    if target is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; valid keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        f = fields[name]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            sub_cls = type(f.default_factory())
            kwargs[name] = _build(sub_cls, value, key)
        elif name == "ema" and cls is Config:
            if isinstance(value, dict):
                value = [value]
            if not isinstance(value, list):
                raise ConfigError("ema must be a list of tables ([[ema]] in TOML)")
            kwargs[name] = [_build(EMAConfig, v, "ema") for v in value]
        else:
            kwargs[name] = _coerce(key, value, f.type)
            choices = CHOICES.get(key)
            if choices and kwargs[name] not in choices:
                raise ConfigError(f"{key} must be one of {list(choices)}, got {kwargs[name]!r}")
    out = cls(**kwargs)
    for name in fields:
        choices = CHOICES.get(f"{prefix}.{name}" if prefix else name)
        if choices and getattr(out, name) not in choices:
            raise ConfigError(f"{prefix}.{name} must be one of {list(choices)}, got {getattr(out, name)!r}")
    return out


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def _parse_value(text: str) -> Any:
    """A command-line value: TOML/JSON literal if it parses (numbers, true, lists, tables), else a string."""
    lowered = text.strip()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(lowered)
    except json.JSONDecodeError:
        pass
    try:
        import tomllib

        return tomllib.loads(f"v = {lowered}")["v"]
    except Exception:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a raw config dict (before validation)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. run.total_steps=2000)")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {dotted!r} is empty or malformed")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {p} is not a table")
        node[parts[-1]] = _parse_value(raw)
    return data


def _read_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need `pip install pyyaml` (or use TOML)") from None
        return yaml.safe_load(text) or {}
    if path.suffix == ".json":
        return json.loads(text)
    raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml, .yaml or .json")


def load_config(source: str | os.PathLike | dict | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Load and validate a config from a file path (TOML/YAML/JSON) or a dict, with dotted overrides."""
    if source is None:
        data = {}
    elif isinstance(source, dict):
        data = source
    else:
        data = _read_file(source)
    data = apply_overrides(data, list(overrides))
    config = _build(Config, data, "")
    _check_ranges(config)
    _check_data(config.data, {item.split("=", 1)[0].strip() for item in overrides})
    _check_sampling(config.model)
    return config


_PATH_SOURCES = {
    "folder": "a folder of images",
    "zip": "a .zip of images (EDM's dataset_tool)",
    "npz": "an .npz",
    "captions": "a folder of images with same-stem .txt captions, or a .jsonl/.csv/.parquet caption manifest",
    "latents": "a latent cache (a folder with a cm-latents manifest.json)",
}
_PATH_SUFFIXES = {".zip": "zip", ".npz": "npz", ".jsonl": "captions", ".csv": "captions", ".parquet": "captions"}


def path_source(path: str) -> str:
    """The data.source a data.path implies: a .zip, an .npz, a caption manifest (.jsonl, .csv,
    .parquet) by its name; a folder holding a cm-latents manifest.json is a latent cache; else a
    folder (a folder of captioned images too: its recipe says data.source = "captions"). A path that
    does not exist counts as a folder: a run's config must load where its data is absent, e.g. to sample."""
    kind = _PATH_SUFFIXES.get(Path(path).suffix.lower())
    if kind:
        return kind
    manifest = Path(os.path.expanduser(path)) / "manifest.json"
    try:  # cm_train.captions.cache_latents writes "format" first: no need to parse a big caption list
        with open(manifest, "rb") as f:
            head = f.read(256)
    except OSError:
        return "folder"
    return "latents" if re.match(rb'\s*\{\s*"format"\s*:\s*"cm-latents"', head) else "folder"


def _check_data(d: DataConfig, overridden: set[str]) -> None:
    """data.path is never silently ignored. A path given on the command line, with a source from
    the file, decides the source (digits.toml data.path=mydigits/ trains on mydigits/); a built-in
    source given on the command line (digits, gmm: they read no path) drops the file's path; a
    source and a path that disagree otherwise are refused."""
    if not d.path:
        return
    kind = path_source(d.path)
    if d.source == kind or (kind == "folder" and d.source in ("captions", "latents")):
        return  # a caption folder looks like any folder, an absent latent cache too
    if "data.path" in overridden and "data.source" not in overridden:
        d.source = kind
        return
    if "data.source" in overridden and "data.path" not in overridden and d.source in ("digits", "gmm"):
        d.path = ""
        return
    reads = _PATH_SOURCES.get(d.source, "no data.path (it is built in)")
    raise ConfigError(
        f"data.source = {d.source!r} reads {reads}, but data.path {d.path} names {_PATH_SOURCES[kind]}: "
        f"set data.source={kind}, or drop data.path"
    )


# Numeric keys and the values they accept: (low, low inclusive, high, high inclusive, hint); None:
# unbounded on that side. Checked once at load, so a bad value fails with its key before any work
# (e.g. run.batch_size = 0 used to end in a ZeroDivisionError, optim.lr < 0 in torch's message).
_RANGES = {
    "run.total_steps": (1, True, None, False, "the number of optimizer steps"),
    "run.batch_size": (1, True, None, False, "the global batch"),
    "run.batch_per_rank": (0, True, None, False, "0 = the global batch / ranks"),
    "run.grad_bucket_mb": (0, False, None, False, "MB per all-reduce bucket"),
    "run.threads": (0, True, None, False, "0 chooses from the free cores"),
    "data.resolution": (0, True, None, False, "0 keeps the dataset's size"),
    "data.channels": (0, True, None, False, "0 keeps the dataset's channels; 1 or 3 converts"),
    "data.num_classes": (0, True, None, False, "0 takes it from the dataset"),
    "model.sigma_data": (0, False, None, False, ""),
    "model.sigma_min": (0, False, None, False, ""),
    "optim.lr": (0, False, None, False, "a learning rate"),
    "optim.weight_decay": (0, True, None, False, ""),
    "optim.eps": (0, False, None, False, ""),
    "optim.warmup_steps": (0, True, None, False, ""),
    "optim.decay_steps": (0, True, None, False, "0 = run.total_steps"),
    "optim.grad_clip": (0, True, None, False, "0 = off"),
    "precision.init_scale": (0, False, None, False, ""),
    "checkpoint.every": (0, True, None, False, "0 = only at the end"),
    "checkpoint.keep_last": (1, True, None, False, ""),
    "checkpoint.eval_count": (1, True, None, False, ""),
    "checkpoint.early_stop_patience": (0, True, None, False, "0 = never"),
    "log.every": (1, True, None, False, ""),
    "log.sample_every": (0, True, None, False, "0 = only at the end"),
    "log.sample_count": (0, True, None, False, "0 = no sample grids"),
    "guard.max_bad_steps": (1, True, None, False, ""),
    "guard.window": (1, True, None, False, ""),
    "guard.lr_factor": (0, False, 1, True, ""),
    "guard.max_rollbacks": (0, True, None, False, ""),
    "ema.decay": (0, True, 1, False, ""),
    "ema.sigma_rel": (0, False, None, False, ""),
}


# What a resumed run may change. FIXED keys define the network, what it is trained to be, or the
# data it sees: a change cannot continue the run. FREE keys change nothing the run has learned.
# Everything else (run length, optimizer, seed, batch, data path, teacher path, guard, ...) needs
# run.allow_config_change = true and is logged.
_RESUME_FIXED = (
    "model.preset", "model.overrides", "model.sigma_data", "model.sigma_min", "model.c_noise", "model.boundary",
    "objective.name", "objective.kwargs", "objective.target", "model.lora", "model.pipeline_dtype", "data.source", "data.resolution", "data.channels",
    "data.conditional", "data.num_classes", "data.gmm_components", "data.gmm_dim", "ema", "precision.mode",
)  # fmt: skip
_RESUME_FREE = ("run.dir", "run.device", "run.resume", "run.compile", "run.allow_config_change",
                "run.grad_bucket_mb", "run.threads", "log.", "checkpoint.", "model.sample_")  # fmt: skip


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in ("model.overrides", "objective.kwargs", "model.lora"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _matches(key: str, names: tuple) -> bool:
    return any(key == n or key.startswith(n + ".") or (n.endswith((".", "_")) and key.startswith(n)) for n in names)


def resume_changes(saved: dict, config: Config) -> tuple[list[str], list[str]]:
    """(fixed, asked): the keys whose values differ between a checkpoint's saved config and
    ``config``, each as "key: old -> new", split into those a resumed run can never change and
    those it may change with run.allow_config_change = true. Keys absent on either side (a newer
    or older cm-train) are not compared."""
    old, new = _flatten(saved), _flatten(config_to_dict(config))
    fixed, asked = [], []
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        if isinstance(a, list) or isinstance(b, list):
            a, b = json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)  # tuples and lists alike
        if a == b or _matches(key, _RESUME_FREE):
            continue
        change = f"{key}: {old[key]!r} -> {new[key]!r}"
        (fixed if _matches(key, _RESUME_FIXED) else asked).append(change)
    return fixed, asked


def _check_ranges(config: Config) -> None:
    for key, (lo, lo_incl, hi, hi_incl, hint) in _RANGES.items():
        section, name = key.split(".")
        objs = config.ema if section == "ema" else [getattr(config, section)]
        for i, obj in enumerate(objs):
            value = getattr(obj, name)
            bad_lo = lo is not None and (value < lo if lo_incl else value <= lo)
            bad_hi = hi is not None and (value > hi if hi_incl else value >= hi)
            if bad_lo or bad_hi or value != value:  # NaN fails too
                where = f"ema[{i}].{name}" if section == "ema" else key
                lo_s = f"{'>=' if lo_incl else '>'} {lo}" if lo is not None else ""
                hi_s = f"{'<=' if hi_incl else '<'} {hi}" if hi is not None else ""
                want = " and ".join(x for x in (lo_s, hi_s) if x)
                raise ConfigError(f"{where} must be {want}{f' ({hint})' if hint else ''}, got {value!r}")
    betas = config.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {list(betas)}")


def _check_sampling(m: ModelConfig) -> None:
    if m.sample_sigma_min < 0:
        raise ConfigError(f"model.sample_sigma_min must be >= 0 (0: model.sigma_min), got {m.sample_sigma_min}")
    sigmas = m.sample_sigmas
    if sigmas:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sigmas):
            raise ConfigError(f"model.sample_sigmas must be a list of numbers, got {list(sigmas)}")
        m.sample_sigmas = tuple(float(v) for v in sigmas)
        if any(b >= a for a, b in zip(m.sample_sigmas, m.sample_sigmas[1:])) or m.sample_sigmas[-1] < m.eval_sigma_min:
            raise ConfigError(
                f"model.sample_sigmas must decrease and stay >= the sampling sigma_min {m.eval_sigma_min}, "
                f"got {list(m.sample_sigmas)}"
            )
