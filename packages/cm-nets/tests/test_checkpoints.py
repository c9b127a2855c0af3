import collections
import io
import json
import pickle
import sys
import types

import cm_nets
import pytest
import torch
from cm_nets.testing import SMALL, RunsEval, RunsShellCommand, make_inputs


@pytest.mark.parametrize("name", ["adm-imagenet64-bcm", "ncsnpp-cifar10", "edm2-xs", "mlp-toy"])
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(0)
    net = cm_nets.create(name, **SMALL[name][0]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    path = cm_nets.save(net, tmp_path / "net")
    assert path.name == "net.safetensors" and (tmp_path / "net.json").exists()
    meta = json.loads((tmp_path / "net.json").read_text())
    assert meta["preset"] == name and meta["format"] == "cm-nets"
    back = cm_nets.load(path).eval()
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, c, kw = make_inputs(name)
    with torch.no_grad():
        assert torch.equal(net(x, c, **kw), back(x, c, **kw))
    # The weights file alone suffices (config in the safetensors header).
    (tmp_path / "net.json").unlink()
    assert cm_nets.read_config(path)["preset"] == name
    if name != "mlp-toy":
        again = cm_nets.load(path, attention_backend="math")
        assert again.cm_nets_config["overrides"]["attention_backend"] == "math"


def test_save_rejects_unknown_modules(tmp_path):
    with pytest.raises(ValueError, match="cm_nets.create"):
        cm_nets.save(torch.nn.Linear(2, 2), tmp_path / "x")


# ---------------------------------------------------------------- openai / BCM .pt


def test_openai_state_dict_round_trip(tmp_path):
    overrides = SMALL["adm-imagenet64-bcm"][0]
    torch.manual_seed(0)
    net = cm_nets.create("adm-imagenet64-bcm", **overrides).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # what openai / BCM training writes: a plain state dict, here with DDP's "module." prefix
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ema_0.99997.pt")
    back = cm_nets.from_openai(tmp_path / "ema_0.99997.pt", **overrides).eval()
    assert back.cm_nets_config["preset"] == "adm-imagenet64-bcm"  # guessed from time_embed_end
    x, c, kw = make_inputs("adm-imagenet64-bcm")
    with torch.no_grad():
        torch.testing.assert_close(back(x, c, **kw), net(x, c, **kw), atol=0, rtol=0)


def test_openai_guesses_and_conv1d_weights():
    overrides = SMALL["adm-imagenet64"][0]
    net = cm_nets.create("adm-imagenet64", **overrides)
    sd = net.state_dict()
    assert cm_nets.convert.guess_adm_preset(sd) == "adm-imagenet64"
    no32 = cm_nets.create("adm-imagenet64-no32-qkv", **overrides).state_dict()
    assert cm_nets.convert.guess_adm_preset(no32) == "adm-imagenet64-no32-qkv"
    # guided-diffusion writes the attention 1×1 convs as Conv1d [3C, C, 1]; they load as well
    sd1 = {k: (v[..., 0] if k.endswith(("qkv.weight", "proj_out.weight")) else v) for k, v in sd.items()}
    assert any(v.dim() == 3 for v in sd1.values())
    back = cm_nets.from_openai(sd1, preset="adm-imagenet64", **overrides)
    assert torch.equal(back.middle_block[1].qkv.weight, net.middle_block[1].qkv.weight)


def test_openai_rejects_code_in_pt(tmp_path):
    torch.save({"w": torch.ones(1), "f": print}, tmp_path / "bad.pt")  # a pickled global callable
    with pytest.raises(ValueError, match=r"bad.pt holds objects other than tensors .*print") as err:
        cm_nets.from_openai(tmp_path / "bad.pt")
    assert "weights_only" not in str(err.value)  # never the advice to load code


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", r"x.pt is empty; expected a .pt checkpoint file"),
        (b"101\n", r"x.pt is not a PyTorch checkpoint"),
        (bytes(range(256)) * 8, r"x.pt is not a (readable )?PyTorch checkpoint"),
        (b"PK\x03\x04" + b"\x00" * 40, r"x.pt is not a readable PyTorch checkpoint"),
    ],
    ids=["empty", "text", "random", "truncated-zip"],
)
def test_openai_bad_files_give_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        cm_nets.from_openai(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


# ---------------------------------------------------------------- EDM .pkl


class _Persistent:
    """Mimics a torch_utils.persistence object: pickles as _reconstruct_persistent_obj(meta),
    where meta carries the class source code (which a normal unpickle would exec)."""

    def __init__(self, class_name, state):
        self.meta = dict(
            type="class",
            version=6,
            module_src="raise SystemExit('source code executed')",
            class_name=class_name,
            state=state,
        )

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def _as_persistent(module):
    state = dict(
        training=module.training,
        _parameters=collections.OrderedDict(module._parameters),
        _buffers=collections.OrderedDict(module._buffers),
        _modules=collections.OrderedDict(
            (n, _as_persistent(m) if m is not None else None) for n, m in module._modules.items()
        ),
    )
    return _Persistent(type(module).__name__, state)


def _edm_snapshot(net):
    """pickle bytes shaped like an EDM network-snapshot-*.pkl: {"ema": EDMPrecond(model=net), ...}."""
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by cm_nets
        raise AssertionError("code from the pickle ran")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules["torch_utils"] = types.ModuleType("torch_utils")
    sys.modules["torch_utils.persistence"] = fake
    try:
        precond = _Persistent(
            "EDMPrecond",
            dict(
                training=False,
                _parameters={},
                _buffers={},
                sigma_data=0.5,
                _modules=collections.OrderedDict(model=_as_persistent(net)),
            ),
        )
        return pickle.dumps({"ema": precond, "augment_pipe": None, "dataset_kwargs": {"resolution": 32}})
    finally:
        del sys.modules["torch_utils.persistence"], sys.modules["torch_utils"]


@pytest.mark.parametrize("name", ["ncsnpp-cifar10", "ddpmpp-cifar10"])
def test_edm_pickle_round_trip(tmp_path, name):
    overrides = dict(SMALL[name][0], label_dim=10)
    torch.manual_seed(0)
    net = cm_nets.create(name, **overrides).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (tmp_path / "network-snapshot.pkl").write_bytes(_edm_snapshot(net))
    back = cm_nets.from_edm(tmp_path / "network-snapshot.pkl", name, **overrides).eval()
    x, c, _ = make_inputs(name)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    with torch.no_grad():
        assert torch.equal(back(x, c, labels), net(x, c, labels))
    if name == "ncsnpp-cifar10":  # the Fourier frequencies are a buffer and travel too
        assert torch.equal(back.map_noise.freqs, net.map_noise.freqs)


@pytest.mark.parametrize("payload", [RunsShellCommand(), RunsEval()], ids=["os.system", "eval"])
def test_malicious_pickle_is_refused(tmp_path, payload):
    data = pickle.dumps({"ema": payload})
    with pytest.raises(cm_nets.UnsafePickleError, match="refusing to load global"):
        cm_nets.read_edm_pickle(io.BytesIO(data))


def test_malicious_storage_bytes_are_refused():
    """torch.storage._load_from_bytes normally calls torch.load(weights_only=False)."""
    buf = io.BytesIO()
    torch.save({"x": RunsShellCommand()}, buf)

    class Smuggler:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (buf.getvalue(),))

    with pytest.raises(pickle.UnpicklingError):
        cm_nets.read_edm_pickle(io.BytesIO(pickle.dumps({"ema": Smuggler()})))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails before its rename leaves the previous weights and no temporary files."""
    import os

    first = cm_nets.create("mlp-toy", dim=3, hidden=8, depth=1, emb_dim=4)
    path = cm_nets.save(first, tmp_path / "net")
    before = path.read_bytes()
    second = cm_nets.create("mlp-toy", dim=3, hidden=8, depth=1, emb_dim=4)
    torch.nn.init.normal_(second.out.weight)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        cm_nets.save(second, tmp_path / "net")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.json", "net.safetensors"]
    cm_nets.save(second, tmp_path / "net")
    torch.testing.assert_close(cm_nets.load(path).out.weight, second.out.weight)
