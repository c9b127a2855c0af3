import pytest
from cm_train import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[run]\ntotal_steps = 100\n[optim]\nlr = 2e-4\n[[ema]]\nkind = "power"\nsigma_rel = 0.1\n')
    cfg = load_config(
        path, ["run.total_steps=250", "optim.betas=[0.9, 0.99]", "model.overrides={dim = 3}", "objective.kwargs.s1=640"]
    )
    assert cfg.run.total_steps == 250 and cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.9, 0.99)
    assert cfg.ema[0].kind == "power" and cfg.ema[0].sigma_rel == 0.1
    assert cfg.model.overrides == {"dim": 3} and cfg.objective.kwargs == {"s1": 640}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"run": {"total_step": 5}}, r"unknown key run.total_step .*valid keys: \[.*'total_steps'"),
        ({"runn": {}}, r"unknown key runn"),
        ({"run": {"total_steps": "many"}}, r"run.total_steps must be an integer"),
        ({"run": {"compile": 1}}, r"run.compile must be true or false"),
        ({"optim": {"name": "sgd"}}, r"optim.name must be one of \['adam', 'adamw', 'radam'\]"),
        ({"precision": {"mode": "fp8"}}, r"precision.mode must be one of"),
        ({"ema": [{"kind": "weird"}]}, r"ema.kind must be one of"),
        ({"data": {"source": "imagenet"}}, r"data.source must be one of"),
        # numeric ranges: one line naming the key (batch_size = 0 was a ZeroDivisionError, a negative
        # lr torch's "Invalid learning rate" without the key)
        ({"run": {"batch_size": 0}}, r"run.batch_size must be >= 1 \(the global batch\), got 0"),
        ({"run": {"total_steps": -5}}, r"run.total_steps must be >= 1"),
        ({"optim": {"lr": -1e-3}}, r"optim.lr must be > 0 \(a learning rate\), got -0.001"),
        ({"optim": {"lr": float("nan")}}, r"optim.lr must be > 0"),
        ({"optim": {"betas": [0.9, 1.0]}}, r"optim.betas must be two numbers in \[0, 1\)"),
        ({"guard": {"lr_factor": 1.5}}, r"guard.lr_factor must be > 0 and <= 1"),
        ({"checkpoint": {"keep_last": 0}}, r"checkpoint.keep_last must be >= 1"),
        ({"ema": [{"decay": 0.9}, {"decay": 1.0}]}, r"ema\[1\].decay must be >= 0 and < 1, got 1.0"),
        ({"model": {"sigma_min": 0}}, r"model.sigma_min must be > 0"),
    ],
)
def test_bad_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config({}, ["run.total_steps"])
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert any(p.stem == "digits" for p in configs)
    for path in configs:
        load_config(path)


def test_data_path_is_never_ignored(tmp_path):
    """`cm train digits.toml data.path=mydigits` used to train on the embedded digits and exit 0."""
    from pathlib import Path

    configs = Path(__file__).parents[1] / "configs"
    digits, ect = configs / "digits.toml", configs / "ect-cifar10.toml"
    assert load_config(digits).data.source == "digits"
    assert load_config(digits, [f"data.path={tmp_path}"]).data.source == "folder"
    assert load_config(digits, ["data.path=x/cifar10.zip"]).data.source == "zip"
    assert load_config(digits, ["data.path=x/faces.NPZ"]).data.source == "npz"
    assert load_config(ect, [f"data.path={tmp_path}"]).data.source == "folder"  # the file's zip gives way
    swapped = load_config(ect, ["data.source=digits"])  # a built-in source drops the file's path
    assert swapped.data.source == "digits" and swapped.data.path == ""
    with pytest.raises(ConfigError, match=r"data.source = 'zip' reads a .zip .*x/a.npz names an .npz: set data.source=npz"):
        load_config({"data": {"source": "zip", "path": "x/a.npz"}})
    with pytest.raises(ConfigError, match=r"data.source = 'digits' reads no data.path"):
        load_config(digits, ["data.source=digits", "data.path=x/a.zip"])
