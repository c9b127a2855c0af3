"""cm_train: train consistency models with any cm_core objective on 1 CPU, 1 GPU or many nodes.

``cm_train.run(cm_train.load_config("configs/digits.toml", ["run.total_steps=2000"]))``, or
``python -m cm_train --config configs/digits.toml run.total_steps=2000``. Launch unchanged under
``mpiexec -n 8``, ``srun`` or ``torchrun --nproc_per_node 8``.
"""

from .checkpoint import (
    CheckpointCorrupt,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    usable_checkpoint,
    verify_checkpoint,
)
from .config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from .data import ArrayDataset, BatchStream, build_dataset
from .distributed import DistInfo, detect_launcher
from .images import make_grid, write_png
from .inference import TrainedModel, kind_of, load_trained, resolve_checkpoint
from .callbacks import Callback, append_metrics
from .loop import EXIT_INTERRUPTED, DivergenceError, Interrupted, Trainer, build_function, run
from .state import TrainState
from .step import train_step

__version__ = "0.3.0"
__all__ = [
    "ArrayDataset",
    "BatchStream",
    "Callback",
    "append_metrics",
    "Config",
    "ConfigError",
    "DistInfo",
    "DivergenceError",
    "EXIT_INTERRUPTED",
    "Interrupted",
    "TrainState",
    "Trainer",
    "TrainedModel",
    "apply_overrides",
    "atomic_write_text",
    "build_dataset",
    "build_function",
    "config_to_dict",
    "detect_launcher",
    "kind_of",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "load_trained",
    "CheckpointCorrupt",
    "usable_checkpoint",
    "verify_checkpoint",
    "make_grid",
    "resolve_checkpoint",
    "run",
    "save_checkpoint",
    "train_step",
    "write_png",
]
