"""Image–caption data for text-to-image distillation, and a cache of its VAE latents.

``CaptionDataset`` reads (image, caption) pairs from a folder (``a.png`` + ``a.txt``) or a manifest
(``.jsonl`` / ``.csv`` / ``.parquet`` with ``image`` and ``caption`` columns) and preprocesses each
image as diffusers' ``train_lcm_distill_lora_sdxl.py`` does: RGB, shorter side resized to
``resolution`` (bilinear), center crop to ``resolution`` × ``resolution``, values in [−1, 1]. It
records SDXL's micro-conditioning per item: ``original_size`` = (height, width) as read and
``crop_top_left`` = (top, left) of the crop in the resized image.

``cache_latents`` runs the caller's VAE over such a dataset once and writes ``shard-*.safetensors``
plus ``manifest.json`` (captions, sizes, crops, shard checksums) into a folder that appears whole or
not at all; ``LatentDataset`` trains from that folder with the same interface (``labels`` are item
indices, ``conditioning(labels)`` gives the prompts and SDXL sizes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from cm_nets import files

from .config import ConfigError

__all__ = ["CAPTION_IMAGE_SUFFIXES", "CaptionDataset", "LatentDataset", "cache_latents", "resize_crop_geometry"]

CAPTION_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
IMAGE_COLUMNS = ("image", "file_name", "path")  # file_name: Hugging Face imagefolder's metadata.jsonl
CAPTION_COLUMNS = ("caption", "text")
LATENT_FORMAT, LATENT_VERSION = "cm-latents", 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("caption datasets need `pip install pillow` (cm-train[images])") from None
    return Image


def resize_crop_geometry(height: int, width: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, width), (crop top, left)) for an image of ``height`` × ``width``.

    torchvision's ``Resize(resolution)`` sets the shorter side to ``resolution`` and the longer to
    ``int(resolution · long / short)`` (truncated); ``train_lcm_distill_lora_sdxl.py`` then takes
    the center crop's corner as ``max(0, int(round((side − resolution) / 2.0)))`` (Python's round,
    half to even), which is also where torchvision's ``CenterCrop`` cuts."""
    if height <= width:
        new_h, new_w = resolution, int(resolution * width / height)
    else:
        new_h, new_w = int(resolution * height / width), resolution
    top = max(0, int(round((new_h - resolution) / 2.0)))
    left = max(0, int(round((new_w - resolution) / 2.0)))
    return (new_h, new_w), (top, left)


class _Progress:
    """A tqdm bar on stderr; ``disable=None`` keeps it quiet when stderr is no terminal (a batch
    job's log), and then a plain line is printed every 10 % instead, so the log still shows progress."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.done, self._next_tenth = max(total, 1), desc, 0, 1
        self.bar, self.lines = None, False
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)
            self.lines = bool(self.bar.disable)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None and not self.bar.disable:
            self.bar.update(n)
        elif self.lines and self.done * 10 // self.total >= self._next_tenth:
            self._next_tenth = self.done * 10 // self.total + 1
            line = f"{self.desc}: {self.done}/{self.total} ({100 * self.done // self.total}%)"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- reading the pairs -------------------------------------------------------------------------


def _read_folder(root: Path) -> tuple[list[Path], list[str], list[str]]:
    images = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in CAPTION_IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not images:
        raise ValueError(
            f"no images found in {root} (looked for {', '.join(CAPTION_IMAGE_SUFFIXES)} in it and its sub-folders): "
            "add images with same-stem .txt captions, or give a .jsonl/.csv/.parquet manifest as data.path"
        )
    captions = []
    for p in images:
        txt = p.with_suffix(".txt")
        try:
            captions.append(txt.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            raise ValueError(
                f"{p} has no caption file {p.stem}.txt: add one (or list the images in a manifest)"
            ) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{txt} is not UTF-8 text ({exc}): save it as UTF-8") from None
    return images, captions, [""] * len(images)


def _pick(row: dict, names: tuple[str, ...]):
    for n in names:
        if n in row and row[n] is not None:
            return row[n]
    return None


def _pair(row, manifest: Path, where: str) -> tuple[Path, str]:
    """One manifest record → (image path, caption); ``where`` is e.g. "line 7" for the messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{manifest} {where}: expected an object with image and caption, got {row!r:.80}")
    image, caption = _pick(row, IMAGE_COLUMNS), _pick(row, CAPTION_COLUMNS)
    for value, names in ((image, IMAGE_COLUMNS), (caption, CAPTION_COLUMNS)):
        if value is None:
            present = sorted(str(k) for k, v in row.items() if v is not None)
            aliases = " or ".join(repr(n) for n in names[1:])
            raise ValueError(f"{manifest} {where}: missing column {names[0]!r} (or {aliases}); it has {present}")
        if not isinstance(value, str):
            raise ValueError(f"{manifest} {where}: {names[0]!r} must be text, got {value!r:.80}")
    if not image.strip():
        raise ValueError(f"{manifest} {where}: the image path is empty")
    path = Path(image.strip())
    return (path if path.is_absolute() else manifest.parent / path), caption.strip()


def _read_text_manifest(manifest: Path, add) -> None:
    """JSON lines or CSV with a header row: ``add(row, "line N")`` for each record."""
    if manifest.suffix.lower() == ".jsonl":
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{manifest} line {n}: not valid JSON ({exc})") from None
                add(row, f"line {n}")
        return
    with open(manifest, encoding="utf-8-sig", newline="") as f:  # -sig: Excel's byte-order mark
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{manifest} is empty: expected a header row with image and caption columns")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            add(row, f"line {reader.line_num}")


def _read_manifest(manifest: Path) -> tuple[list[Path], list[str], list[str]]:
    images, captions, wheres = [], [], []

    def add(row, where):
        image, caption = _pair(row, manifest, where)
        images.append(image)
        captions.append(caption)
        wheres.append(where)

    suffix = manifest.suffix.lower()
    if suffix in (".jsonl", ".csv"):
        try:
            _read_text_manifest(manifest, add)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{manifest} is not UTF-8 text ({exc}): save it as UTF-8") from None
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(
                f"{manifest}: parquet manifests need `pip install pyarrow` (or write the manifest as .jsonl or .csv)"
            ) from None
        try:  # only the columns read here: a parquet file may also hold the images' bytes
            wanted = [n for n in pq.read_schema(manifest).names if n in IMAGE_COLUMNS + CAPTION_COLUMNS]
            table = pq.read_table(manifest, columns=wanted)
        except Exception as exc:  # noqa: BLE001  pyarrow's own error types
            raise ValueError(f"{manifest} is not a readable parquet file ({exc})") from None
        for i, row in enumerate(table.to_pylist()):
            add(row, f"row {i + 1} of {table.num_rows}")
    else:
        raise ValueError(f"{manifest}: a caption manifest must be .jsonl, .csv or .parquet")
    if not images:
        raise ValueError(f"{manifest} lists no images: add rows with image and caption columns")
    return images, captions, wheres


# --- the datasets ------------------------------------------------------------------------------


def _as_index_list(labels: torch.Tensor) -> list[int]:
    return torch.as_tensor(labels).reshape(-1).tolist()


class CaptionDataset:
    """(image, caption) pairs; images decoded on demand, captions and the file list read up front.

    ``path``: a folder of images (png, jpg, jpeg, webp; searched recursively, sorted) each with a
    same-stem ``.txt`` caption beside it, or a ``.jsonl`` / ``.csv`` / ``.parquet`` manifest with
    columns ``image`` (alias ``file_name``, ``path``; relative to the manifest's folder, or
    absolute) and ``caption`` (alias ``text``). ``get`` returns float32 [B, 3, R, R] in [−1, 1] and
    the item indices as labels; ``conditioning(labels)`` the prompts and SDXL's sizes."""

    num_classes = 0

    def __init__(self, path: str | Path, resolution: int):
        path = Path(path).expanduser()
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels (e.g. 1024 for SDXL), got {resolution!r}")
        if path.is_dir():
            self.files, self.captions, self._wheres = _read_folder(path)
        elif path.is_file():
            self.files, self.captions, self._wheres = _read_manifest(path)
        else:
            raise FileNotFoundError(f"caption data {path} does not exist (give a folder of images or a manifest)")
        self.name, self.path, self.resolution = str(path), path, resolution
        self.labels = torch.arange(len(self.files))
        self._sizes: list[tuple[int, int] | None] = [None] * len(self.files)  # (height, width) as read

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_prompts(self) -> int:
        return len(self.files)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.resolution, self.resolution)

    def _where(self, i: int) -> str:
        return f" ({self.path.name} {self._wheres[i]})" if self._wheres[i] else ""

    def _fail(self, i: int, exc: Exception):
        return ValueError(f"cannot read image {self.files[i]}{self._where(i)}: {exc}")

    def _load(self, i: int) -> torch.Tensor:
        """Item ``i`` decoded and preprocessed: float32 [3, R, R] in [−1, 1]."""
        Image = _pil()
        try:
            with Image.open(self.files[i]) as im:
                rgb = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001  PIL raises many types; the file is what matters
            raise self._fail(i, exc) from None
        self._sizes[i] = (rgb.height, rgb.width)
        (new_h, new_w), (top, left) = resize_crop_geometry(rgb.height, rgb.width, self.resolution)
        if (new_h, new_w) != (rgb.height, rgb.width):
            bilinear = getattr(Image, "Resampling", Image).BILINEAR
            rgb = rgb.resize((new_w, new_h), bilinear)
        rgb = rgb.crop((left, top, left + self.resolution, top + self.resolution))
        arr = np.asarray(rgb, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self._load(i) for i in _as_index_list(indices)]), self.labels[indices]

    def original_size(self, i: int) -> tuple[int, int]:
        """(height, width) of item ``i`` as read: from its header (no decode) unless decoded already."""
        if self._sizes[i] is None:
            try:
                with _pil().open(self.files[i]) as im:
                    width, height = im.size
            except Exception as exc:  # noqa: BLE001
                raise self._fail(i, exc) from None
            self._sizes[i] = (height, width)
        return self._sizes[i]

    def conditioning(self, labels: torch.Tensor) -> dict:
        """{"prompts": [B captions], "original_size": [B, 2] (h, w), "crop_top_left": [B, 2] (top, left)}."""
        idx = _as_index_list(labels)
        sizes = [self.original_size(i) for i in idx]
        crops = [resize_crop_geometry(h, w, self.resolution)[1] for h, w in sizes]
        return {
            "prompts": [self.captions[i] for i in idx],
            "original_size": torch.tensor(sizes, dtype=torch.long).reshape(len(idx), 2),
            "crop_top_left": torch.tensor(crops, dtype=torch.long).reshape(len(idx), 2),
        }

    def fingerprint(self) -> str:
        """What a header check depends on: the files' paths, sizes and modification times (OSError
        when one is missing: then the check must run, and it names the file)."""
        h = hashlib.sha256(repr(("captions", self.name, len(self.files))).encode())
        for p in self.files:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def read_headers(self, progress: bool = True) -> None:
        """Read every image's header once (size, format; no decode): a missing, unreadable or
        non-image file is reported now, naming it, instead of at the step that draws it."""
        bar = _Progress(len(self), f"checking {len(self)} caption images", "img", progress)
        try:
            for i in range(len(self)):
                self.original_size(i)
                bar.update(1)
        finally:
            bar.close()


class LatentDataset:
    """A folder written by :func:`cache_latents`: float32 latents [B, C, h, w] from ``get``, prompts
    and SDXL sizes from ``conditioning``. Each shard's sha256 is checked the first time it is
    read; rows are then read through safetensors' memory map, so the cache needs no RAM of its own
    (ranks on one node share the page cache) and nothing is unpickled."""

    num_classes = 0

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} does not exist: {path} is not a latent cache (write one with "
                "cm_train.captions.cache_latents; for a folder of captioned images set data.source=captions)"
            )
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{manifest} is not valid JSON ({exc}): re-run the latent caching") from None
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != LATENT_FORMAT:
            raise ValueError(
                f"{manifest} is not a {LATENT_FORMAT} manifest (format {found!r}): re-run the latent caching"
            )
        if meta.get("version") != LATENT_VERSION:
            raise ValueError(
                f"{manifest} has version {meta.get('version')!r}; this cm-train reads version {LATENT_VERSION}: "
                "re-run the latent caching with this cm-train"
            )
        try:
            count, shape = int(meta["count"]), tuple(int(s) for s in meta["latent_shape"])
            self.dtype = _DTYPES[meta["dtype"]]
            self.captions = [str(c) for c in meta["captions"]]
            sizes = torch.tensor(meta["original_size"], dtype=torch.long).reshape(-1, 2)
            crops = torch.tensor(meta["crop_top_left"], dtype=torch.long).reshape(-1, 2)
            shards = [(str(s["file"]), int(s["count"]), str(s["sha256"])) for s in meta["shards"]]
            self.resolution, self.encoder = int(meta["resolution"]), str(meta.get("encoder", ""))
            self.source = str(meta.get("source", ""))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"{manifest} is incomplete or malformed ({type(exc).__name__}: {exc}): re-run the latent caching"
            ) from None
        if not (len(self.captions) == len(sizes) == len(crops) == count == sum(c for _, c, _ in shards)) or count < 1:
            raise ValueError(f"{manifest}: count, captions, sizes and shard counts disagree: re-run the latent caching")
        for file, _, _ in shards:
            if Path(file).name != file:  # only files inside the cache folder
                raise ValueError(f"{manifest}: shard name {file!r} is not a plain file name: re-run the latent caching")
        self.name, self.path, self.latent_shape = str(path), path, shape
        self.labels = torch.arange(count)
        self._original_size, self._crop_top_left = sizes, crops
        self._shards = shards
        starts = np.cumsum([0] + [c for _, c, _ in shards])
        self._shard_of = np.repeat(np.arange(len(shards)), [c for _, c, _ in shards])
        self._start = starts[:-1]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_prompts(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.latent_shape

    def _slice(self, k: int):
        if k not in self._open:
            from safetensors import safe_open

            file, count, digest = self._shards[k]
            shard = self.path / file
            if not shard.is_file():
                raise FileNotFoundError(f"{shard} is missing from the latent cache: re-run the latent caching")
            if _sha256(shard) != digest:
                raise ValueError(
                    f"{shard}: sha256 does not match {self.path / 'manifest.json'} (the file is corrupt or was "
                    "changed): re-run the latent caching into a fresh folder"
                )
            try:
                handle = safe_open(str(shard), framework="pt")  # kept open: a memory map of the shard
                sl = handle.get_slice("latents")
                found_shape, found_dtype = tuple(sl.get_shape()), sl.get_dtype()
            except Exception as exc:  # noqa: BLE001  safetensors' own error types
                raise ValueError(f"{shard} is not a readable latent shard ({exc}): re-run the latent caching") from None
            want = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[self.dtype]
            if found_shape != (count, *self.latent_shape) or found_dtype != want:
                raise ValueError(
                    f"{shard} holds {found_dtype} {list(found_shape)}, the manifest says {want} "
                    f"{[count, *self.latent_shape]}: re-run the latent caching"
                )
            self._open[k] = (handle, sl)
        return self._open[k][1]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for i in _as_index_list(indices):
            k = int(self._shard_of[i])
            r = i - int(self._start[k])
            rows.append(self._slice(k)[r : r + 1])
        return torch.cat(rows).float(), self.labels[indices]

    def conditioning(self, labels: torch.Tensor) -> dict:
        """{"prompts": [B captions], "original_size": [B, 2] (h, w), "crop_top_left": [B, 2] (top, left)}."""
        idx = torch.as_tensor(labels).reshape(-1).cpu()
        return {
            "prompts": [self.captions[i] for i in idx.tolist()],
            "original_size": self._original_size[idx],
            "crop_top_left": self._crop_top_left[idx],
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- writing the cache -------------------------------------------------------------------------


def cache_latents(
    dataset,
    encode,
    out_dir: str | Path,
    *,
    encoder: str = "",
    batch_size: int = 16,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Encode every image of ``dataset`` (a :class:`CaptionDataset`) once and write a latent cache.

    ``encode(images)`` maps float32 [B, 3, R, R] in [−1, 1] (on the CPU; move them yourself) to
    latents [B, C, h, w], already multiplied by the VAE's scaling factor, e.g.
    ``lambda x: vae.encode(x.to(dev, vae.dtype)).latent_dist.sample() * vae.config.scaling_factor``.
    ``encoder`` is recorded in the manifest (say which VAE, e.g. its folder).

    Writes ``out_dir/shard-00000.safetensors`` … (tensor ``latents``, ``dtype``) and, last,
    ``manifest.json``, all in a temporary sibling folder that is fsynced and renamed onto
    ``out_dir`` only when complete: an error or a kill midway leaves no partial cache under that
    name (a kill leaves ``.<name>.tmp-<pid>``, safe to delete). An existing non-empty ``out_dir``
    is refused unless ``overwrite``, and then replaced only once the new cache is whole."""
    out_dir = Path(out_dir).expanduser()
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32; got {dtype}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    count = len(dataset)
    if count < 1:
        raise ValueError(f"{dataset.name} has no images to cache")
    files.restore_aside(out_dir)  # a kill between the two renames of an earlier overwrite
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: give a folder for the latent cache")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty: choose a new folder, or pass overwrite=True to replace it "
            "once the new cache is complete"
        )
    dtype_name = str(dtype).removeprefix("torch.")
    latent_shape, shards = None, []
    captions, sizes, crops = [], [], []
    bar = _Progress(count, f"caching latents of {count} images", "img", progress)
    try:
        with files.atomic_dir(out_dir) as tmp, torch.no_grad():
            from safetensors.torch import save_file

            for start in range(0, count, shard_size):
                stop = min(start + shard_size, count)
                parts = []
                for b in range(start, stop, batch_size):
                    idx = torch.arange(b, min(b + batch_size, stop))
                    images, _ = dataset.get(idx)
                    lat = _encoded(encode(images), idx, dtype, latent_shape, dataset.name)
                    latent_shape = tuple(lat.shape[1:])
                    cond = dataset.conditioning(idx)
                    captions += cond["prompts"]
                    sizes += cond["original_size"].tolist()
                    crops += cond["crop_top_left"].tolist()
                    parts.append(lat)
                    bar.update(len(idx))
                name = f"shard-{len(shards):05d}.safetensors"
                save_file({"latents": torch.cat(parts)}, str(tmp / name))
                shards.append({"file": name, "count": stop - start, "sha256": _sha256(tmp / name)})
            manifest = {  # "format" first: config.path_source recognises a cache by the file's first bytes
                "format": LATENT_FORMAT,
                "version": LATENT_VERSION,
                "count": count,
                "latent_shape": list(latent_shape),
                "dtype": dtype_name,
                "resolution": int(dataset.resolution),
                "source": str(dataset.name),
                "encoder": str(encoder),
                "shards": shards,
                "captions": captions,
                "original_size": sizes,
                "crop_top_left": crops,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False) + "\n", encoding="utf-8")
    finally:
        bar.close()
    return out_dir


def _encoded(lat, idx: torch.Tensor, dtype: torch.dtype, latent_shape, name: str) -> torch.Tensor:
    """``encode``'s output for items ``idx``, checked and moved to the CPU in the cache's dtype."""
    if not isinstance(lat, torch.Tensor) or lat.ndim < 2 or lat.shape[0] != len(idx):
        got = f"{type(lat).__name__} {list(lat.shape)}" if isinstance(lat, torch.Tensor) else type(lat).__name__
        raise ValueError(
            f"encode must return latents [{len(idx)}, C, h, w] for {len(idx)} images, got {got} "
            "(e.g. vae.encode(x).latent_dist.sample() * vae.config.scaling_factor)"
        )
    lat = lat.detach().to("cpu", dtype).contiguous()
    if latent_shape is not None and tuple(lat.shape[1:]) != latent_shape:
        raise ValueError(f"encode returned latents of shape {list(lat.shape[1:])} after {list(latent_shape)}")
    finite = torch.isfinite(lat.flatten(1)).all(1)
    if not finite.all():  # after the cast: float16 turns values above 65504 into inf
        raise ValueError(
            f"encode gave non-finite latents for {name} items {idx[~finite].tolist()[:5]} (stored as "
            f"{str(dtype).removeprefix('torch.')}): an fp16 VAE overflows (SDXL's does: encode in fp32 or use "
            "madebyollin/sdxl-vae-fp16-fix), or store dtype=torch.float32"
        )
    return lat
