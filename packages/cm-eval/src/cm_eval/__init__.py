"""cm_eval: evaluation for consistency models.

Feature extractors (the FID Inception-v3, DINOv2 via timm, a shipped digits classifier),
statistics files, Fréchet distance, Inception Score, precision/recall, inversion MSE (BCM),
ODE solving error (Direct CM), NFE sweeps and plots, and deterministic distributed sampling.
"""

from cm_nets.files import atomic_save_npz, atomic_write_bytes, decode_png, encode_png, image_grid, load_png, save_png

from ._io import load_image_folder
from .dino import DINOv2Features, dinov2
from .features import compute_stats, digits_class_accuracy, extract, fd_digits, to_float, to_uint8
from .inception import FIDInceptionV3, inception_fid
from .inversion import inversion_error, psnr
from .metrics import class_accuracy, inception_score, knn_radii, precision_recall
from .noise import load_noise, make_noise, save_noise
from .ode_error import default_teacher_sigmas, ode_solving_error, teacher_solutions
from .report import format_table, html_report, plot_curves, plot_image_panels
from .sampling import SAMPLERS, PerImageNoise, generate, parse_seeds, sample_batch
from .stats import (
    FeatureStats,
    SmallSampleWarning,
    frechet_distance,
    frechet_distance_from_features,
    load_reference_batch,
    load_stats,
    save_reference_batch,
    save_stats,
)
from .sweeps import (
    best_two_step_sigma,
    nfe_sweep,
    plot_metric_vs_nfe,
    sample_images,
    save_sample_grid,
    ternary_search,
    write_report,
)

__all__ = [
    "atomic_save_npz",
    "atomic_write_bytes",
    "DINOv2Features",
    "DigitsClassifier",
    "FIDInceptionV3",
    "FeatureStats",
    "SmallSampleWarning",
    "PerImageNoise",
    "SAMPLERS",
    "best_two_step_sigma",
    "class_accuracy",
    "compute_stats",
    "decode_png",
    "default_teacher_sigmas",
    "digits_class_accuracy",
    "load_digits_classifier",
    "digits_reference_stats",
    "dinov2",
    "encode_png",
    "extract",
    "fd_digits",
    "format_table",
    "html_report",
    "frechet_distance",
    "frechet_distance_from_features",
    "generate",
    "image_grid",
    "inception_fid",
    "inception_score",
    "inversion_error",
    "knn_radii",
    "load_digits_data",
    "load_image_folder",
    "load_noise",
    "load_png",
    "load_reference_batch",
    "load_stats",
    "make_noise",
    "nfe_sweep",
    "ode_solving_error",
    "parse_seeds",
    "plot_curves",
    "plot_image_panels",
    "plot_metric_vs_nfe",
    "precision_recall",
    "psnr",
    "sample_batch",
    "sample_images",
    "save_noise",
    "save_png",
    "save_reference_batch",
    "save_sample_grid",
    "save_stats",
    "teacher_solutions",
    "ternary_search",
    "to_float",
    "to_uint8",
    "write_report",
]

__version__ = "0.3.0"

# The digits names load cm_eval.digits_classifier on first use, so that
# `python -m cm_eval.digits_classifier` (the training script) runs a module not yet imported.
_DIGITS = ("DigitsClassifier", "load_digits_classifier", "digits_reference_stats", "load_digits_data")


def __getattr__(name):
    if name in _DIGITS:
        import importlib

        return getattr(importlib.import_module("cm_eval.digits_classifier"), name)
    raise AttributeError(f"module 'cm_eval' has no attribute {name!r}")
