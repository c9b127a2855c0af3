"""The FID Inception-v3: architecture, shapes, and loading pytorch-fid-style weight files."""

import pytest
import torch
from cm_eval import FIDInceptionV3, inception_fid
from cm_eval.inception import _tf_avg_pool


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return inception_fid(None)


def test_architecture_matches_the_fid_inception(net):
    # torchvision's Inception-v3 has 27,161,264 parameters with the aux head and 1000 classes;
    # minus the aux head (3,326,696) plus 8 more classes on fc (8·2048 + 8) gives the FID network.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 94 and all(c.bias is None for c in convs)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 94 and all(b.eps == 0.001 for b in bns)
    keys = list(net.state_dict())
    assert keys[0] == "Conv2d_1a_3x3.conv.weight" and "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys
    assert net.state_dict()["fc.weight"].shape == (1008, 2048)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_output_shapes_and_determinism(net):
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = net(x)
    assert set(out) == {"pool", "logits"}
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert (out["pool"] >= 0).all()  # an average of ReLU outputs
    # The rest at 75×75, the smallest size the network takes, without the 299 resize (CPU time).
    small = FIDInceptionV3(resize=False).eval()
    small.load_state_dict(net.state_dict())
    x = torch.rand(2, 3, 75, 75, generator=torch.Generator().manual_seed(1))
    out = small(x)
    torch.testing.assert_close(small(x)["pool"], out["pool"], rtol=0, atol=0)
    # Each image is processed independently: batch of 2 == two batches of 1.
    torch.testing.assert_close(small(x[1:])["logits"], out["logits"][1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.rand(2, 1, 32, 32))


def test_tf_style_pooling():
    # TF's average pool ignores padding: a constant image stays constant at the border.
    x = torch.ones(1, 2, 5, 5)
    torch.testing.assert_close(_tf_avg_pool(x), x)
    assert FIDInceptionV3().Mixed_7c.pool == "max" and FIDInceptionV3().Mixed_7b.pool == "avg"


def test_loads_a_weight_file_as_is(tmp_path):
    torch.manual_seed(2)
    src = FIDInceptionV3()
    for m in src.modules():  # non-trivial BatchNorm statistics so that loading matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    # pytorch-fid's file predates num_batches_tracked: leave it out like the real file.
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception-test.pth")
    loaded = inception_fid(tmp_path / "pt_inception-test.pth")
    loaded.resize = src.resize = False  # compare at 75×75 to save CPU time
    x = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(x)["pool"], src.eval()(x)["pool"], rtol=0, atol=0)


def test_clear_errors_for_missing_or_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception_fid(tmp_path / "nope.pth")
    state = FIDInceptionV3().state_dict()
    bad = {k.replace("Mixed_", "mixed_"): v for k, v in state.items()}
    bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(bad, tmp_path / "torchvision.pth")
    with pytest.raises(ValueError, match="Missing keys.*Mixed_5b.*unexpected keys.*AuxLogits") as e:
        inception_fid(tmp_path / "torchvision.pth")
    assert "expected 566 keys" in str(e.value) and "fc.weight" in str(e.value)
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "imagenet1000.pth")
    with pytest.raises(ValueError, match=r"wrong shapes: \['fc.bias: file \(1000,\)"):
        inception_fid(tmp_path / "imagenet1000.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        inception_fid(tmp_path / "garbage.pth")
