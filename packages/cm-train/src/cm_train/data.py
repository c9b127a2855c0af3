"""Datasets and the deterministic, resumable, rank-sharded batch stream.

Every dataset yields images as float tensors in [−1, 1], shape [C, H, W] (or vectors [d] for
the toy mixture), with integer class labels (0 when unlabelled); caption data and latent caches
(``cm_train.captions``) carry prompts instead, and their labels are item indices. The global batch
at a given (epoch, position) is the same whatever the number of ranks; each rank takes its slice,
so one rank and many ranks train on identical data.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cm_nets import files

from .captions import CaptionDataset, LatentDataset
from .config import ConfigError, DataConfig

__all__ = [
    "ArrayDataset",
    "LazyImageDataset",
    "CaptionDataset",
    "LatentDataset",
    "build_dataset",
    "BatchStream",
    "StreamState",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ArrayDataset:
    """All samples in memory: x [N, ...] float32 in [−1, 1], labels [N] int64."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0, name: str = ""):
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"dataset {name!r} is empty or has no sample dimension: shape {tuple(x.shape)}")
        self.x = x.float().contiguous()
        self.labels = labels.long() if labels is not None else torch.zeros(len(x), dtype=torch.long)
        if len(self.labels) != len(self.x):
            raise ValueError(f"dataset {name!r}: {len(self.labels)} labels for {len(self.x)} samples")
        self.num_classes = int(num_classes)
        self.name = name

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], self.labels[indices]


def _decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image folders and zips need `pip install pillow`") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    except Exception as exc:
        raise ValueError(f"cannot read image {where}: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr


class LazyImageDataset:
    """Images decoded on demand from a folder (class = sub-folder) or an EDM/StyleGAN zip."""

    def __init__(self, read, names: list[str], labels: list[int], num_classes: int, name: str):
        if not names:
            raise ValueError(f"no images found in {name} (looked for {', '.join(IMAGE_SUFFIXES)})")
        self._read, self.names, self.name = read, names, name
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = num_classes
        self.convert = None  # per image, before the size check: data.resolution / data.channels
        first = self._load(0)
        self._shape = tuple(first.shape)

    def _load(self, i: int) -> torch.Tensor:
        arr = _decode_image(self._read(self.names[i]), f"{self.name}/{self.names[i]}")
        return torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).float() / 127.5 - 1

    def __len__(self) -> int:
        return len(self.names)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = []
        for i in indices.tolist():
            img = self._load(i)
            if self.convert is not None:
                img = self.convert(img[None])[0]
            if tuple(img.shape) != self._shape:
                raise ValueError(
                    f"{self.name}/{self.names[i]} has shape {tuple(img.shape)} but the first image has "
                    f"{self._shape}: all images must share one size (resize them, or set data.resolution)"
                )
            imgs.append(img)
        return torch.stack(imgs), self.labels[indices]


def _folder(path: Path) -> LazyImageDataset:
    if not path.is_dir():
        raise FileNotFoundError(f"image folder {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files} - {"."})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(p.parent.relative_to(path).as_posix(), 0) for p in files]
    names = [p.relative_to(path).as_posix() for p in files]
    return LazyImageDataset(lambda n: (path / n).read_bytes(), names, labels, len(classes), str(path))


def _zip(path: Path) -> LazyImageDataset:
    if not path.is_file():
        raise FileNotFoundError(f"dataset zip {path} does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a zip file") from None
    names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
    labels, num_classes = [0] * len(names), 0
    if "dataset.json" in zf.namelist():
        where = f"{path}: dataset.json"
        try:
            meta = json.loads(zf.read("dataset.json"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where} is not valid JSON ({exc}); fix or remove it") from None
        table = meta.get("labels") if isinstance(meta, dict) else None
        if table is not None:
            mapping = {}
            for entry in table:
                ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
                lab = entry[1] if ok else None
                if not ok or isinstance(lab, bool) or not isinstance(lab, int):
                    raise ValueError(f"{where}: labels entries must be [file name, integer label], got {entry!r}")
                mapping[entry[0]] = lab
            missing = [n for n in names if n not in mapping]
            if missing:
                raise ValueError(f"{where} has no label for {missing[0]} ({len(missing)} images)")
            labels = [mapping[n] for n in names]
            _check_labels(labels, where)
            num_classes = max(labels) + 1
    return LazyImageDataset(zf.read, names, labels, num_classes, str(path))


def _npz(path: Path) -> ArrayDataset:
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    with np.load(path) as data:
        key = "arr_0" if "arr_0" in data else ("images" if "images" in data else None)
        if key is None:
            raise ValueError(f"{path}: expected an 'images' or 'arr_0' array, found {sorted(data.files)}")
        arr = data[key]
        labels = data["labels"] if "labels" in data else (data["arr_1"] if "arr_1" in data else None)
    if arr.ndim != 4:
        raise ValueError(f"{path}: images must be [N, H, W, C] (ADM) or [N, C, H, W], got shape {arr.shape}")
    x = torch.from_numpy(arr)
    if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # channels last (ADM's layout)
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(
            f"{path}: images have {x.shape[1]} channels (shape {tuple(arr.shape)}); 1 (grey) or 3 (RGB) are "
            "supported: drop the alpha channel, e.g. arr[..., :3]"
        )
    if arr.dtype == np.uint8:
        x = x.float() / 127.5 - 1
    else:
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError(f"{path}: {int((~torch.isfinite(x)).sum())} image values are NaN or infinite")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"{path}: float images must lie in [-1, 1], these span [{lo:g}, {hi:g}]; store uint8 0..255 "
                "images (converted here) or scale floats to [-1, 1]"
            )
    lab = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(arr) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: labels must be {len(arr)} integers, got {labels.dtype} of shape {labels.shape}")
        _check_labels(labels.tolist(), str(path))
        lab = torch.from_numpy(labels).long()
    return ArrayDataset(x, lab, int(lab.max()) + 1 if lab is not None else 0, str(path))


def _check_labels(labels, where: str) -> None:
    """Class labels are 0..K-1: a negative one would wrap around in the label embedding."""
    bad = [lab for lab in labels if lab < 0]
    if bad:
        raise ValueError(f"{where}: class labels must be >= 0, found {bad[0]} ({len(bad)} negative)")


def _digits() -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the built-in digits dataset needs `pip install scikit-learn`") from None
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 8.0 - 1.0  # 0..16 → [−1, 1]
    return ArrayDataset(x, torch.from_numpy(d.target), 10, "digits")


def _gmm(cfg: DataConfig, seed: int) -> ArrayDataset:
    from cm_core import GaussianMixture

    gen = torch.Generator().manual_seed(seed)
    k, d = cfg.gmm_components, cfg.gmm_dim
    means = torch.randn(k, d, generator=gen, dtype=torch.float64) * 0.8
    gm = GaussianMixture(means, 0.1)
    x, labels = gm.sample(8192, gen, return_labels=True)
    return ArrayDataset(x.float(), labels, k, "gmm")


def _resize(ds, cfg: DataConfig):
    """Resize / change channels once for in-memory data; lazily for image folders."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            return x
        if cfg.channels and x.shape[1] != cfg.channels:
            if cfg.channels == 1:
                x = x.mean(1, keepdim=True)
            elif cfg.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            else:
                raise ConfigError(f"data.channels={cfg.channels}: cannot convert {x.shape[1]}-channel images")
        if cfg.resolution and x.shape[-1] != cfg.resolution:
            x = F.interpolate(
                x, size=(cfg.resolution, cfg.resolution), mode="bilinear", antialias=True, align_corners=False
            ).clamp(-1, 1)
        return x.contiguous()

    if isinstance(ds, ArrayDataset):
        ds.x = convert(ds.x)
        return ds
    if cfg.channels or cfg.resolution:  # each image on its own, before the size check
        ds.convert = convert
        ds._shape = tuple(convert(ds._load(0)[None]).shape[1:])
    return ds


def _check_cache_dir() -> Path:
    return Path(os.environ.get("CM_TRAIN_CACHE", Path.home() / ".cache" / "cm_train")) / "checked-datasets"


def _fingerprint(ds, cfg: DataConfig) -> str:
    """What a dataset check depends on: the files (names, sizes, modification times) and the settings."""
    import hashlib

    h = hashlib.sha256(repr((ds.name, cfg.resolution, cfg.channels, len(ds.names))).encode())
    root = Path(ds.name)
    if root.is_file():  # a zip: the archive itself
        st = root.stat()
        h.update(repr((st.st_size, st.st_mtime_ns)).encode())
    else:
        for n in ds.names:
            st = (root / n).stat()
            h.update(f"{n}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def validate_images(ds, cfg: DataConfig) -> None:
    """Decode every image of a folder/zip dataset once before training, with a progress bar: a
    corrupt or truncated file, an unsupported mode or a size that differs from the first image (without
    data.resolution) is reported now, naming the file, instead of at the step that draws it. A dataset
    that passed is remembered (by its files' names, sizes and times) and not decoded again."""
    if not isinstance(ds, LazyImageDataset):
        return
    key = _fingerprint(ds, cfg)
    stamp = _check_cache_dir() / f"{key}.ok"
    if stamp.exists():
        return
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    idx = range(len(ds.names))
    bar = tqdm(idx, desc=f"checking {len(ds.names)} images", unit="img", file=sys.stderr, disable=None) if tqdm else idx
    for i in bar:
        ds.get(torch.tensor([i]))  # decodes, converts and checks the size; names the file on failure
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(f"{ds.name}\n")
    except OSError:
        pass  # no cache: the check runs again next time


def validate_captions(ds: CaptionDataset) -> None:
    """Read every caption image's header once before training, with a progress bar (the captions
    were all read when the dataset was built): a missing or unreadable image is reported now, naming
    the file. A dataset that passed is remembered, like in validate_images, by its files' paths,
    sizes and times."""
    try:
        stamp = _check_cache_dir() / f"{ds.fingerprint()}.ok"
    except OSError:  # a listed image is missing: the check below names it
        stamp = None
    if stamp is not None and stamp.exists():
        return
    ds.read_headers(progress=True)
    if stamp is not None:
        try:
            files.atomic_write_text(stamp, f"{ds.name}\n")
        except OSError:
            pass  # no cache: the check runs again next time


def _text_image_dataset(cfg: DataConfig):
    """data.source = captions | latents: (image, prompt) pairs for text-to-image distillation. Not
    class data: no class labels (labels are item indices for conditioning()), no _resize (captions
    resize and center-crop to data.resolution themselves, as diffusers' SDXL scripts do)."""
    if not cfg.path:
        what = {
            "captions": "a folder of images with same-stem .txt captions, or a .jsonl/.csv/.parquet manifest",
            "latents": "a folder written by cm_train.captions.cache_latents",
        }[cfg.source]
        raise ConfigError(f"data.source = {cfg.source!r} needs data.path: {what}")
    if cfg.num_classes:
        raise ConfigError(f"data.num_classes = {cfg.num_classes}: {cfg.source} data have prompts, not classes; set 0")
    path = Path(os.path.expanduser(cfg.path))
    if cfg.source == "latents":
        ds = LatentDataset(path)
        if cfg.resolution and cfg.resolution != ds.resolution:
            raise ConfigError(
                f"data.resolution = {cfg.resolution}, but the latents in {path} were cached from {ds.resolution}-pixel "
                f"crops: set data.resolution = {ds.resolution} (or 0), or cache the images again at {cfg.resolution}"
            )
        if cfg.channels and cfg.channels != ds.sample_shape[0]:
            raise ConfigError(
                f"data.channels = {cfg.channels}, but the latents in {path} have {ds.sample_shape[0]} channels: set 0"
            )
        return ds
    if not cfg.resolution:
        raise ConfigError(
            "data.source = 'captions' needs data.resolution, the square crop in pixels: "
            "e.g. 1024 for SDXL, 512 for SD 1.5"
        )
    if cfg.channels not in (0, 3):
        raise ConfigError(f"data.channels = {cfg.channels}: caption images are RGB; set 0 or 3")
    ds = CaptionDataset(path, cfg.resolution)
    validate_captions(ds)
    return ds


def build_dataset(cfg: DataConfig, seed: int = 0):
    if cfg.source in ("captions", "latents"):
        return _text_image_dataset(cfg)
    if cfg.source == "digits":
        ds = _digits()
    elif cfg.source == "gmm":
        ds = _gmm(cfg, seed)
    elif cfg.source in ("folder", "zip", "npz"):
        if not cfg.path:
            raise ConfigError(f"data.source = {cfg.source!r} needs data.path")
        path = Path(os.path.expanduser(cfg.path))
        ds = {"folder": _folder, "zip": _zip, "npz": _npz}[cfg.source](path)
    else:
        raise ConfigError(
            f"data.source must be one of digits, gmm, folder, zip, npz, captions, latents; got {cfg.source!r}"
        )
    if cfg.conditional and ds.num_classes < 2 and not cfg.num_classes:
        raise ConfigError(f"data.conditional = true but {ds.name or cfg.source} has no class labels")
    if cfg.num_classes:
        top = int(ds.labels.max()) if cfg.conditional and len(ds.labels) else -1
        if top >= cfg.num_classes:
            raise ConfigError(
                f"data.num_classes = {cfg.num_classes}, but {ds.name or cfg.source} has label {top}: set "
                f"data.num_classes >= {top + 1} (or 0 to take it from the data)"
            )
        ds.num_classes = cfg.num_classes
    ds = _resize(ds, cfg)
    validate_images(ds, cfg)
    return ds


@dataclass
class StreamState:
    epoch: int = 0
    position: int = 0  # index of the next global batch's first sample in this epoch's order


class BatchStream:
    """Global batches in a seeded per-epoch order; rank r gets rows [r·b, (r+1)·b) of each.

    The order of epoch e is ``randperm(N)`` from a generator seeded with (seed, e); the flips of
    a global batch come from (seed, e, position). Incomplete final batches are dropped.
    """

    def __init__(self, dataset, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0, hflip: bool = False):
        if global_batch % world:
            raise ConfigError(f"run.batch_size={global_batch} is not divisible by the {world} ranks")
        if global_batch > len(dataset):
            raise ConfigError(f"run.batch_size={global_batch} exceeds the dataset size {len(dataset)}")
        self.dataset, self.global_batch = dataset, global_batch
        self.rank, self.world, self.seed, self.hflip = rank, world, seed, hflip
        self.state = StreamState()
        self._order = None
        self._order_epoch = -1

    def _epoch_order(self) -> torch.Tensor:
        if self._order_epoch != self.state.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.epoch)
            self._order = torch.randperm(len(self.dataset), generator=g)
            self._order_epoch = self.state.epoch
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch (x, labels)."""
        if self.state.position + self.global_batch > len(self.dataset):
            self.state = StreamState(self.state.epoch + 1, 0)
        order = self._epoch_order()
        idx = order[self.state.position : self.state.position + self.global_batch]
        per = self.global_batch // self.world
        mine = idx[self.rank * per : (self.rank + 1) * per]
        x, y = self.dataset.get(mine)
        if self.hflip and x.ndim == 4:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.state.epoch) * 1_000_033 + self.state.position
            )
            flips = torch.rand(self.global_batch, generator=g)[self.rank * per : (self.rank + 1) * per] < 0.5
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        self.state = StreamState(self.state.epoch, self.state.position + self.global_batch)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["position"]))
