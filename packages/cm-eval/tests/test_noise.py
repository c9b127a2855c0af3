"""Fixed initial noise files (cm_eval.noise): per-image reproducibility, the file format, its errors."""

import zipfile

import pytest
import torch
from cm_eval import load_noise, make_noise, save_noise
from cm_eval.noise import _image_seed

SHAPE = (4, 8, 8)


def test_deterministic_and_per_image_from_its_own_generator():
    a = make_noise(SHAPE, 5, seed=3)
    assert a.shape == (5, *SHAPE) and a.dtype == torch.float32
    assert torch.equal(a, make_noise(SHAPE, 5, seed=3))
    # image i is exactly a randn draw from the generator seeded with hash(seed, i), independent of num
    for i in range(5):
        g = torch.Generator().manual_seed(_image_seed(3, i))
        assert torch.equal(a[i], torch.randn(SHAPE, generator=g))


def test_prefix_property():
    big = make_noise(SHAPE, 12, seed=7)
    for k in (1, 5, 11):
        assert torch.equal(make_noise(SHAPE, k, seed=7), big[:k])


def test_seeds_give_unrelated_images():
    a, b = make_noise(SHAPE, 4, seed=0), make_noise(SHAPE, 4, seed=1)
    # no image repeats across or within the two streams (a naive seed + i would give a[1] == b[0])
    flat = torch.cat([a, b]).flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 8
    # and they look independent: correlation of paired images ~ N(0, 1/256)
    corr = (a.flatten(1) * b.flatten(1)).mean(1)
    assert corr.abs().max() < 5 / 16, corr
    x = make_noise((64, 64), 8, seed=0)
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.02  # 32768 draws: std of the mean ≈ 0.0055


def test_dtype_is_a_rounding_of_the_float32_draw():
    a = make_noise(SHAPE, 3, seed=2)
    assert torch.equal(make_noise(SHAPE, 3, seed=2, dtype=torch.float16), a.half())
    assert torch.equal(make_noise(SHAPE, 3, seed=2, dtype=torch.float64), a.double())


@pytest.mark.parametrize("bad", [dict(shape=(), num=1), dict(shape=(4, 0), num=1), dict(shape=SHAPE, num=0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="shape|num"):
        make_noise(bad["shape"], bad["num"])


def test_round_trip_and_weights_only(tmp_path):
    noise = make_noise(SHAPE, 6, seed=11)
    path = save_noise(tmp_path / "sub" / "init_noise.pt", noise, seed=11)
    assert [p.name for p in path.parent.iterdir()] == ["init_noise.pt"]  # no temporary left behind
    got, meta = load_noise(path)
    assert torch.equal(got, noise)
    assert meta == {"seed": 11, "shape": list(SHAPE), "format": "cm-noise", "version": 1}
    # the file holds only tensors and plain types: a plain weights_only load reads it
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"noise", "seed", "shape", "format", "version"}
    assert torch.equal(raw["noise"], noise)


def test_refuses_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "n.pt"
    save_noise(path, make_noise(SHAPE, 2, seed=0), seed=0)
    with pytest.raises(FileExistsError, match="n.pt exists.*overwrite"):
        save_noise(path, make_noise(SHAPE, 2, seed=1), seed=1)
    assert load_noise(path)[1]["seed"] == 0  # untouched
    save_noise(path, make_noise(SHAPE, 3, seed=1), seed=1, overwrite=True)
    noise, meta = load_noise(path)
    assert meta["seed"] == 1 and torch.equal(noise, make_noise(SHAPE, 3, seed=1))


def _one_line_naming(exc, path):
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_missing_corrupt_and_foreign_files(tmp_path):
    missing = tmp_path / "none.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_noise(missing)
    _one_line_naming(e, missing)

    good = save_noise(tmp_path / "good.pt", make_noise(SHAPE, 2), seed=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="not a readable noise file") as e:
            load_noise(path)
        _one_line_naming(e, path)

    foreign = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a cm-noise file") as e:
        load_noise(foreign)
    _one_line_naming(e, foreign)

    newer = tmp_path / "v2.pt"
    torch.save({**torch.load(good, weights_only=True), "version": 2}, newer)
    with pytest.raises(ValueError, match="version 2") as e:
        load_noise(newer)
    _one_line_naming(e, newer)

    inconsistent = tmp_path / "shape.pt"
    torch.save({**torch.load(good, weights_only=True), "shape": [3, 8, 8]}, inconsistent)
    with pytest.raises(ValueError, match="damaged") as e:
        load_noise(inconsistent)
    _one_line_naming(e, inconsistent)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"noise": torch.zeros(1, 2), "seed": 0, "shape": [2], "format": "cm-noise", "version": 1,
                "x": _Payload()}, path)  # fmt: skip
    with pytest.raises(ValueError, match="not a readable noise file") as e:
        load_noise(path)
    _one_line_naming(e, path)
    assert "pickled code ran" not in capsys.readouterr().out
    assert zipfile.is_zipfile(path)  # a real torch.save archive, refused for its content
