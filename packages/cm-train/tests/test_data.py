import json
import zipfile

import numpy as np
import pytest
import torch
from cm_train import BatchStream, build_dataset
from cm_train.config import ConfigError, DataConfig


def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_digits_are_the_real_sklearn_digits():
    ds = build_dataset(DataConfig(source="digits"))
    assert len(ds) == 1797 and ds.sample_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x.min() >= -1 and ds.x.max() <= 1 and ds.x.std() > 0.3
    from sklearn.datasets import load_digits

    ref = load_digits()
    torch.testing.assert_close(ds.x[5, 0], torch.from_numpy(ref.images[5]).float() / 8 - 1)
    resized = build_dataset(DataConfig(source="digits", resolution=16))
    assert resized.sample_shape == (1, 16, 16)


def test_stream_is_deterministic_sharded_and_resumable():
    ds = build_dataset(DataConfig(source="digits"))
    one = BatchStream(ds, 64, seed=3, hflip=True)
    ranks = [BatchStream(ds, 64, rank=r, world=2, seed=3, hflip=True) for r in range(2)]
    for _ in range(40):  # crosses an epoch boundary (1797 // 64 = 28 batches)
        x, y = one.next()
        parts = [s.next() for s in ranks]
        torch.testing.assert_close(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    assert one.state.epoch == 1
    state = one.state_dict()
    expect = one.next()
    again = BatchStream(ds, 64, seed=3, hflip=True)
    again.load_state_dict(state)
    got = again.next()
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    ds = build_dataset(DataConfig(source="folder", path=str(tmp_path)))
    assert len(ds) == 6 and ds.num_classes == 2 and ds.sample_shape == (3, 8, 8)
    x, y = ds.get(torch.arange(6))
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and x.min() >= -1 and x.max() <= 1


def test_bad_data_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_TRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "empty")))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _png(mixed / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(mixed / "b.png", np.zeros((9, 9, 3), np.uint8))
    # every image is checked before training (it used to fail at the step that drew it)
    with pytest.raises(ValueError, match="b.png has shape"):
        build_dataset(DataConfig(source="folder", path=str(mixed)))
    resized = build_dataset(DataConfig(source="folder", path=str(mixed), resolution=8))  # the advice works
    assert resized.get(torch.arange(2))[0].shape == (2, 3, 8, 8)
    (mixed / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*c.png"):
        build_dataset(DataConfig(source="folder", path=str(mixed), resolution=8))
    good = tmp_path / "good"
    good.mkdir()
    _png(good / "a.png", np.zeros((8, 8, 3), np.uint8))
    _png(good / "b.png", np.zeros((8, 8, 3), np.uint8))
    stamps = lambda: set((tmp_path / "cache" / "checked-datasets").glob("*.ok"))  # noqa: E731
    before = stamps()
    build_dataset(DataConfig(source="folder", path=str(good)))  # checked once, remembered
    assert len(stamps() - before) == 1
    (good / "b.png").write_bytes((good / "b.png").read_bytes()[:30])  # truncated later: a new check
    with pytest.raises(ValueError, match="cannot read image .*b.png"):
        build_dataset(DataConfig(source="folder", path=str(good)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(DataConfig(source="folder", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="needs data.path"):
        build_dataset(DataConfig(source="npz"))


def test_edm_zip_with_labels(tmp_path):
    import io

    from PIL import Image

    path = tmp_path / "ds.zip"
    with zipfile.ZipFile(path, "w") as zf:
        labels = []
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(buf, format="png")
            name = f"00000/img{i:08d}.png"
            zf.writestr(name, buf.getvalue())
            labels.append([name, i % 2])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    ds = build_dataset(DataConfig(source="zip", path=str(path), conditional=True))
    x, y = ds.get(torch.arange(4))
    assert y.tolist() == [0, 1, 0, 1] and ds.num_classes == 2
    torch.testing.assert_close(x[1].mean(), torch.tensor(40 / 127.5 - 1))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("00000/img99999999.png", zf.read("00000/img00000000.png"))
    with pytest.raises(ValueError, match="no label for 00000/img99999999.png"):
        build_dataset(DataConfig(source="zip", path=str(path)))


def test_npz_adm_layout(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=arr)
    ds = build_dataset(DataConfig(source="npz", path=str(tmp_path / "ref.npz")))
    assert ds.sample_shape == (3, 6, 6)
    torch.testing.assert_close(ds.x[2, 1], torch.from_numpy(arr[2, :, :, 1]).float() / 127.5 - 1)


def test_bad_labels_and_arrays_are_refused_before_training(tmp_path, monkeypatch):
    import io

    from PIL import Image

    monkeypatch.setenv("CM_TRAIN_CACHE", str(tmp_path / "cache"))
    npz = tmp_path / "a.npz"
    np.savez(npz, np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"a.npz: class labels must be >= 0, found -1"):
        build_dataset(DataConfig(source="npz", path=str(npz), conditional=True))
    np.savez(npz, np.zeros((4, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"a.npz: images have 4 channels .*drop the alpha channel"):
        build_dataset(DataConfig(source="npz", path=str(npz)))
    np.savez(npz, np.full((4, 3, 8, 8), 200.0, np.float32))
    with pytest.raises(ValueError, match=r"float images must lie in \[-1, 1\], these span \[200, 200\]"):
        build_dataset(DataConfig(source="npz", path=str(npz)))
    bad = np.zeros((4, 3, 8, 8), np.float32)
    bad[0, 0, 0, 0] = np.nan
    np.savez(npz, bad)
    with pytest.raises(ValueError, match=r"1 image values are NaN or infinite"):
        build_dataset(DataConfig(source="npz", path=str(npz)))
    np.savez(npz, np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, 3]))
    with pytest.raises(ConfigError, match=r"data.num_classes = 3, but .*a.npz has label 3: set data.num_classes >= 4"):
        build_dataset(DataConfig(source="npz", path=str(npz), conditional=True, num_classes=3))
    for table, match in [
        ('{"labels": [["0.png", null]]}', r"dataset.json: labels entries must be \[file name, integer label\]"),
        ('{"labels": [["0.png", -3]]}', r"dataset.json: class labels must be >= 0, found -3"),
        ("{not json", r"dataset.json is not valid JSON"),
    ]:
        path = tmp_path / "d.zip"
        with zipfile.ZipFile(path, "w") as zf:
            buf = io.BytesIO()
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
            zf.writestr("0.png", buf.getvalue())
            zf.writestr("dataset.json", table)
        with pytest.raises(ValueError, match=match):
            build_dataset(DataConfig(source="zip", path=str(path), conditional=True))
