"""Image–caption datasets, the latent cache, and their data.source integration (CPU, PIL images in tmp_path)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cm_train import build_dataset, load_config
from cm_train.captions import CaptionDataset, LatentDataset, cache_latents
from cm_train.config import ConfigError, DataConfig, path_source

Image = pytest.importorskip("PIL.Image", reason="caption datasets need pillow")
BILINEAR = getattr(Image, "Resampling", Image).BILINEAR
DIGITS = Path(__file__).parents[1] / "configs" / "digits.toml"


@pytest.fixture(autouse=True)
def _check_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_TRAIN_CACHE", str(tmp_path / "cache"))


def _image(path: Path, h: int, w: int, seed: int = 0, caption: str | None = None) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **({"lossless": True} if path.suffix == ".webp" else {}))
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return arr


def _folder(root: Path, n: int = 5, size=(12, 10)) -> Path:
    for i in range(n):
        _image(root / f"img{i}.png", size[0] + i, size[1] + 2 * i, seed=i, caption=f"a photo number {i}")
    return root


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 127.5 + 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


# --- CaptionDataset ----------------------------------------------------------------------------


def test_folder_pairs_are_recursive_sorted_and_stripped(tmp_path):
    root = tmp_path / "data"
    _image(root / "b.png", 10, 10, caption="  second\n")
    _image(root / "a.JPG", 10, 14, caption="first")
    _image(root / "sub" / "c.webp", 16, 10, caption="third, in a sub-folder ✓")
    (root / "notes.md").write_text("not an image")
    (root / "orphan.txt").write_text("a caption without an image")
    ds = CaptionDataset(root, 8)
    assert [p.relative_to(root).as_posix() for p in ds.files] == ["a.JPG", "b.png", "sub/c.webp"]
    assert ds.captions == ["first", "second", "third, in a sub-folder ✓"]
    assert len(ds) == ds.num_prompts == 3 and ds.num_classes == 0 and ds.sample_shape == (3, 8, 8)
    assert torch.equal(ds.labels, torch.arange(3))
    x, y = ds.get(torch.tensor([2, 0]))
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32 and torch.equal(y, torch.tensor([2, 0]))
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1  # resized noise


def test_missing_caption_and_empty_folder_are_one_clear_line(tmp_path):
    root = tmp_path / "data"
    _image(root / "a.png", 8, 8, caption="ok")
    _image(root / "b.png", 8, 8)  # no b.txt
    with pytest.raises(ValueError) as err:
        CaptionDataset(root, 8)
    assert str(err.value) == f"{root / 'b.png'} has no caption file b.txt: add one (or list the images in a manifest)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found in .*empty .*\.png.*manifest"):
        CaptionDataset(tmp_path / "empty", 8)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        CaptionDataset(tmp_path / "nowhere", 8)
    with pytest.raises(ValueError, match="resolution must be a positive"):
        CaptionDataset(root, 0)


def test_jsonl_manifest_relative_absolute_and_alias_columns(tmp_path):
    meta = tmp_path / "meta"
    _image(meta / "imgs" / "a.png", 8, 8)
    _image(tmp_path / "elsewhere" / "b.png", 8, 8, seed=1)
    rows = [
        {"image": "imgs/a.png", "caption": " relative "},
        {"file_name": str(tmp_path / "elsewhere" / "b.png"), "text": "absolute, Hugging Face names"},
        {"path": "imgs/a.png", "caption": "alias path", "extra": 1},
    ]
    manifest = meta / "train.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    ds = CaptionDataset(manifest, 8)
    assert ds.files == [meta / "imgs" / "a.png", tmp_path / "elsewhere" / "b.png", meta / "imgs" / "a.png"]
    assert ds.captions == ["relative", "absolute, Hugging Face names", "alias path"]
    assert ds.get(torch.arange(3))[0].shape == (3, 3, 8, 8)


def test_bad_manifest_rows_name_the_file_line_and_column(tmp_path):
    jl = tmp_path / "m.jsonl"
    jl.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 2: missing column 'caption' \(or 'text'\)"):
        CaptionDataset(jl, 8)
    jl.write_text('{"caption": "x"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 1: missing column 'image' \(or 'file_name' or 'path'\)"):
        CaptionDataset(jl, 8)
    jl.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png", \n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 2: not valid JSON"):
        CaptionDataset(jl, 8)
    jl.write_text('{"image": 3, "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 1: 'image' must be text"):
        CaptionDataset(jl, 8)
    jl.write_text("\n")
    with pytest.raises(ValueError, match=r"m\.jsonl lists no images"):
        CaptionDataset(jl, 8)
    # an image the manifest lists but that is not there: named with its manifest line when read
    jl.write_text('{"image": "gone.png", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"cannot read image .*gone\.png \(m\.jsonl line 1\)"):
        CaptionDataset(jl, 8).get(torch.tensor([0]))


def test_csv_manifest_with_aliases_and_a_short_row(tmp_path):
    _image(tmp_path / "imgs" / "a.png", 8, 8)
    _image(tmp_path / "imgs" / "b.png", 8, 8, seed=1)
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('\ufeffpath, text\nimgs/a.png,"a cat, sitting"\nimgs/b.png,plain\n', encoding="utf-8")
    ds = CaptionDataset(csv_path, 8)
    assert ds.files == [tmp_path / "imgs" / "a.png", tmp_path / "imgs" / "b.png"]
    assert ds.captions == ["a cat, sitting", "plain"]
    csv_path.write_text("image,caption\nimgs/a.png,fine\nimgs/b.png\n")
    with pytest.raises(ValueError, match=r"m\.csv line 3: missing column 'caption'"):
        CaptionDataset(csv_path, 8)
    csv_path.write_bytes("image,caption\nimgs/a.png,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"m\.csv is not UTF-8 text .*save it as UTF-8"):
        CaptionDataset(csv_path, 8)
    csv_path.write_text("file,caption\nimgs/a.png,fine\n")
    with pytest.raises(ValueError, match=r"m\.csv line 2: missing column 'image'.*'caption', 'file'"):
        CaptionDataset(csv_path, 8)


def test_parquet_manifest(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet manifests need pyarrow, not installed here")
    import pyarrow.parquet as pq

    _image(tmp_path / "a.png", 8, 8)
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"file_name": ["a.png", "a.png"], "text": ["one", None]}), path)
    with pytest.raises(ValueError, match=r"m\.parquet row 2 of 2: missing column 'caption'"):
        CaptionDataset(path, 8)
    pq.write_table(pa.table({"image": ["a.png"], "caption": ["one"]}), path)
    ds = CaptionDataset(path, 8)
    assert ds.files == [tmp_path / "a.png"] and ds.captions == ["one"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # import pyarrow → ImportError
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match=r"m\.parquet: parquet manifests need `pip install pyarrow`"):
        CaptionDataset(tmp_path / "m.parquet", 8)


@pytest.mark.parametrize(
    "h, w, resized, top_left",
    [
        (20, 37, (16, 29), (0, 6)),  # 16·37/20 = 29.6 truncates to 29; (29 − 16)/2 = 6.5 rounds half to even: 6
        (45, 30, (24, 16), (4, 0)),  # portrait
        (16, 16, (16, 16), (0, 0)),  # already the size: no resize
        (9, 11, (16, 19), (0, 2)),  # upscaled: 16·11/9 = 19.6 → 19; 1.5 → 2
    ],
)
def test_resize_then_center_crop_matches_pil_done_by_hand(tmp_path, h, w, resized, top_left):
    arr = _image(tmp_path / "x.png", h, w, caption="x")
    ds = CaptionDataset(tmp_path, 16)
    expect = Image.fromarray(arr)
    if resized != (h, w):
        expect = expect.resize(resized[::-1], BILINEAR)
    t, l = top_left
    expect = np.asarray(expect.crop((l, t, l + 16, t + 16)))
    got = ds.get(torch.tensor([0]))[0][0]
    assert got.shape == (3, 16, 16)
    np.testing.assert_array_equal(_to_uint8(got), expect)
    cond = ds.conditioning(torch.tensor([0]))
    assert cond["original_size"].tolist() == [[h, w]] and cond["crop_top_left"].tolist() == [list(top_left)]


def test_preprocessing_matches_torchvision_as_the_diffusers_script_uses_it(tmp_path):
    T = pytest.importorskip("torchvision.transforms", reason="torchvision is not installed")
    arr = _image(tmp_path / "x.png", 30, 47, caption="x")
    ds = CaptionDataset(tmp_path, 20)
    ref = T.Compose([T.Resize(20, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(20), T.ToTensor()])
    expect = ref(Image.fromarray(arr)) * 2 - 1  # Normalize([0.5], [0.5])
    torch.testing.assert_close(ds.get(torch.tensor([0]))[0][0], expect, atol=1e-6, rtol=0)


def test_grey_and_rgba_images_become_rgb(tmp_path):
    Image.fromarray(np.full((8, 12), 255, np.uint8)).save(tmp_path / "grey.png")
    (tmp_path / "grey.txt").write_text("grey")
    Image.fromarray(np.zeros((12, 8, 4), np.uint8)).save(tmp_path / "rgba.png")
    (tmp_path / "rgba.txt").write_text("rgba")
    x = CaptionDataset(tmp_path, 8).get(torch.arange(2))[0]
    assert x.shape == (2, 3, 8, 8) and bool((x[0] == 1).all()) and bool((x[1] == -1).all())


def test_conditioning_reads_headers_without_decoding(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    ds = CaptionDataset(root, 8)
    from PIL import ImageFile

    def no_decode(self, *a, **k):
        raise AssertionError("conditioning() decoded an image")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decode)
        cond = ds.conditioning(torch.tensor([3, 0, 3]))
    assert cond["prompts"] == ["a photo number 3", "a photo number 0", "a photo number 3"]
    # img3: 15 × 16 → shorter side 8: 8 × int(8·16/15) = 8 × 8, no crop; img0: 12 × 10 → int(8·12/10) = 9 × 8
    assert cond["original_size"].dtype == torch.long
    assert cond["original_size"].tolist() == [[15, 16], [12, 10], [15, 16]]
    assert cond["crop_top_left"].tolist() == [[0, 0], [0, 0], [0, 0]]
    img4 = ds.conditioning(torch.tensor([4]))  # 16 × 18 → 8 × 9: left = round(0.5) = 0
    assert img4["original_size"].tolist() == [[16, 18]] and img4["crop_top_left"].tolist() == [[0, 0]]
    fresh = CaptionDataset(root, 8)
    fresh.get(torch.arange(5))  # sizes recorded by decoding agree with the headers
    again = fresh.conditioning(torch.tensor([3, 0, 3]))
    assert torch.equal(again["original_size"], cond["original_size"])
    assert torch.equal(again["crop_top_left"], cond["crop_top_left"])


# --- the latent cache --------------------------------------------------------------------------

_W = torch.tensor([[0.5, -0.25, 0.1], [0.0, 1.0, -0.5], [0.3, 0.3, 0.3], [-1.0, 0.2, 0.7]])


def _encode(x: torch.Tensor) -> torch.Tensor:
    """A stand-in VAE: 2× average pooling, then a fixed 3 → 4 channel map."""
    return torch.einsum("oc,bchw->bohw", _W, F.avg_pool2d(x, 2))


def test_cache_round_trip_across_shards(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=5), 8)
    out = cache_latents(
        ds, _encode, tmp_path / "lat", encoder="toy-vae", batch_size=2, shard_size=3, dtype=torch.float32,
        progress=False,
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["format"] == "cm-latents" and meta["version"] == 1 and meta["count"] == 5
    assert meta["latent_shape"] == [4, 4, 4] and meta["dtype"] == "float32" and meta["resolution"] == 8
    assert meta["encoder"] == "toy-vae" and meta["source"] == ds.name
    assert [s["count"] for s in meta["shards"]] == [3, 2] and all(len(s["sha256"]) == 64 for s in meta["shards"])
    assert meta["captions"] == ds.captions
    lat = LatentDataset(out)
    assert len(lat) == lat.num_prompts == 5 and lat.num_classes == 0 and lat.sample_shape == (4, 4, 4)
    assert lat.resolution == 8 and lat.encoder == "toy-vae" and torch.equal(lat.labels, torch.arange(5))
    idx = torch.tensor([4, 0, 3, 2])  # both shards, out of order
    x, y = lat.get(idx)
    assert x.dtype == torch.float32 and torch.equal(y, idx)
    torch.testing.assert_close(x, _encode(ds.get(idx)[0]))
    want, got = ds.conditioning(idx), lat.conditioning(idx)
    assert got["prompts"] == want["prompts"]
    assert torch.equal(got["original_size"], want["original_size"])
    assert torch.equal(got["crop_top_left"], want["crop_top_left"])
    assert meta["original_size"][1] == [13, 12] and meta["crop_top_left"][1] == [0, 0]


def test_float16_cache_and_progress_lines_without_a_terminal(tmp_path, capsys):
    ds = CaptionDataset(_folder(tmp_path / "data", n=10), 8)
    out = cache_latents(ds, _encode, tmp_path / "lat", batch_size=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("caching latents")]
    assert len(lines) == 10 and lines[-1].endswith("10/10 (100%)")  # pytest's stderr is no terminal
    lat = LatentDataset(out)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"
    x = lat.get(torch.arange(10))[0]
    assert x.dtype == torch.float32
    ref = _encode(ds.get(torch.arange(10))[0])
    torch.testing.assert_close(x, ref.half().float())


def test_a_changed_shard_is_named_on_first_read(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=4), 8)
    out = cache_latents(ds, _encode, tmp_path / "lat", shard_size=2, progress=False)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one latent value
    shard.write_bytes(bytes(data))
    lat = LatentDataset(out)  # checks are lazy: shard 0 is fine
    lat.get(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: sha256 does not match .*re-run the latent cach"):
        lat.get(torch.tensor([0, 3]))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001\.safetensors is missing"):
        LatentDataset(out).get(torch.tensor([2]))


def test_bad_or_missing_manifest(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"plain/manifest\.json does not exist"):
        LatentDataset(tmp_path / "plain")
    ds = CaptionDataset(_folder(tmp_path / "data", n=2), 8)
    out = cache_latents(ds, _encode, tmp_path / "lat", progress=False)
    meta = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(ValueError, match=r"manifest\.json has version 2; this cm-train reads version 1"):
        LatentDataset(out)
    (out / "manifest.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ValueError, match=r"is not a cm-latents manifest"):
        LatentDataset(out)
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "shards"}))
    with pytest.raises(ValueError, match=r"manifest\.json is incomplete or malformed \(KeyError: 'shards'\)"):
        LatentDataset(out)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=3), 8)
    out = tmp_path / "lat"
    out.mkdir()  # an empty folder may be filled
    cache_latents(ds, _encode, out, progress=False)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"lat exists and is not empty: .*overwrite=True"):
        cache_latents(ds, lambda x: 2 * _encode(x), out, progress=False)
    assert (out / "manifest.json").read_bytes() == before
    cache_latents(ds, lambda x: 2 * _encode(x), out, progress=False, overwrite=True, dtype=torch.float32)
    torch.testing.assert_close(LatentDataset(out).get(torch.arange(3))[0], 2 * _encode(ds.get(torch.arange(3))[0]))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it


def test_an_encoder_error_midway_leaves_no_partial_cache(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=6), 8)
    calls = []

    def flaky(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return _encode(x)

    with pytest.raises(RuntimeError, match="simulated"):
        cache_latents(ds, flaky, tmp_path / "lat", batch_size=2, shard_size=2, progress=False)
    assert len(calls) == 3 and not (tmp_path / "lat").exists()  # the first shard was written, then dropped
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lat")]
    good = cache_latents(ds, _encode, tmp_path / "lat", progress=False)
    before = (good / "manifest.json").read_bytes()
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):  # a failed overwrite keeps the complete old cache
        cache_latents(ds, flaky, good, batch_size=2, overwrite=True, progress=False)
    assert (good / "manifest.json").read_bytes() == before and len(LatentDataset(good).get(torch.arange(6))[0]) == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".lat")]


def test_encoder_output_is_checked(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=2), 8)
    with pytest.raises(ValueError, match=r"encode must return latents \[2, C, h, w\] for 2 images, got dict"):
        cache_latents(ds, lambda x: {"latent_dist": x}, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"non-finite latents for .* items \[0, 1\] \(stored as float16\)"):
        cache_latents(ds, lambda x: _encode(x) + 7e4, tmp_path / "b", progress=False)  # > 65504: inf
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- data.source = captions | latents ----------------------------------------------------------


def test_build_dataset_captions_through_the_config(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data", n=4)
    cfg = load_config(DIGITS, ["data.source=captions", f"data.path={root}", "data.resolution=8"])
    assert cfg.data.source == "captions"  # a plain folder with source = captions is not a mismatch
    ds = build_dataset(cfg.data)
    assert isinstance(ds, CaptionDataset) and ds.num_classes == 0 and ds.sample_shape == (3, 8, 8)
    assert len(list((tmp_path / "cache" / "checked-datasets").glob("*.ok"))) == 1
    with monkeypatch.context() as m:  # checked once: not read again while the files are unchanged
        m.setattr(CaptionDataset, "read_headers", lambda self, progress=True: pytest.fail("checked again"))
        build_dataset(cfg.data)
    (root / "img9.png").write_bytes(b"not a png")  # a new, broken file changes the fingerprint
    (root / "img9.txt").write_text("broken")
    with pytest.raises(ValueError, match=r"cannot read image .*img9\.png"):
        build_dataset(cfg.data)
    with pytest.raises(ConfigError, match=r"needs data.resolution, .*1024 for SDXL, 512 for SD 1.5"):
        build_dataset(DataConfig(source="captions", path=str(root)))
    with pytest.raises(ConfigError, match=r"data.source = 'captions' needs data.path"):
        build_dataset(DataConfig(source="captions", resolution=8))


def test_build_dataset_from_a_manifest_validates_every_image(tmp_path):
    _image(tmp_path / "a.png", 8, 8)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "a.png", "caption": "x"}\n{"image": "missing.png", "caption": "y"}\n')
    cfg = load_config(DIGITS, [f"data.path={manifest}", "data.resolution=8"])
    assert cfg.data.source == "captions"  # inferred from the .jsonl
    with pytest.raises(ValueError, match=r"cannot read image .*missing\.png \(m\.jsonl line 2\)"):
        build_dataset(cfg.data)
    assert not list((tmp_path / "cache").rglob("*.ok"))


def test_build_dataset_latents_and_path_inference(tmp_path):
    ds = CaptionDataset(_folder(tmp_path / "data", n=3), 8)
    out = cache_latents(ds, _encode, tmp_path / "lat", progress=False)
    assert path_source(str(out)) == "latents" and path_source(str(tmp_path / "data")) == "folder"
    assert path_source(str(tmp_path / "absent")) == "folder" and path_source("x/train.CSV") == "captions"
    assert path_source("x/t.parquet") == "captions" and path_source("x/t.zip") == "zip"
    cfg = load_config(DIGITS, [f"data.path={out}"])
    assert cfg.data.source == "latents"
    lat = build_dataset(cfg.data)
    assert isinstance(lat, LatentDataset) and lat.sample_shape == (4, 4, 4) and len(lat) == 3
    assert build_dataset(DataConfig(source="latents", path=str(out), resolution=8)).resolution == 8
    with pytest.raises(ConfigError, match=r"data.resolution = 16, but the latents in .* from 8-pixel crops"):
        build_dataset(DataConfig(source="latents", path=str(out), resolution=16))
    with pytest.raises(FileNotFoundError, match=r"data/manifest\.json does not exist.*data.source=captions"):
        build_dataset(load_config(DIGITS, ["data.source=latents", f"data.path={tmp_path / 'data'}"]).data)
    with pytest.raises(ConfigError, match=r"source = .folder. reads a folder of images, .*set data.source=captions"):
        load_config(DIGITS, ["data.source=folder", "data.path=x/train.jsonl"])
    with pytest.raises(ConfigError, match=r"source = 'captions' .* names a latent cache .*set data.source=latents"):
        load_config(DIGITS, ["data.source=captions", f"data.path={out}"])
