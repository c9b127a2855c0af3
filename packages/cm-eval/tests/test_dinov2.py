"""FD-DINOv2's feature extractor through the real timm: weights from a file this test writes in
Meta's layout (a random ViT-S/14, so nothing is downloaded), checked against timm's own model on
inputs preprocessed by hand (bicubic resize, ImageNet mean/std), not against our wrapper."""

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="DINOv2 needs timm: pip install 'cm-eval[dino]'")
from cm_eval import dinov2  # noqa: E402
from cm_eval.dino import dinov2_model_name  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def meta_checkpoint(path, seed=0):
    """A DINOv2 ViT-S/14 checkpoint as Meta publishes it (518 px: 37×37 position embedding, a
    mask token), with layer scales woken up so every block matters."""
    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    state = vit.state_dict()
    for key in state:
        if key.endswith(("ls1.gamma", "ls2.gamma")):
            state[key] = torch.rand_like(state[key]) * 0.5 + 0.25
    state["mask_token"] = torch.zeros(1, 384)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    torch.save(state, path)
    return state


def timm_reference(state, resolution):
    """timm's own ViT at ``resolution``, loaded through timm's own DINOv2 checkpoint filter."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=resolution)
    vit.load_state_dict(checkpoint_filter_fn(dict(state), vit))
    return vit.eval()


def by_hand(x, resolution):
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dinov2_vits14_pretrain.pth"
    return path, meta_checkpoint(path)


def test_model_size_is_read_from_the_weights(checkpoint):
    path, state = checkpoint
    assert dinov2_model_name(state) == "vit_small_patch14_dinov2"
    assert dinov2_model_name({**state, "register_tokens": torch.zeros(1, 4, 384)}) == "vit_small_patch14_reg4_dinov2"
    assert dinov2_model_name({"cls_token": torch.zeros(1, 1, 1024)}) == "vit_large_patch14_dinov2"
    with pytest.raises(ValueError, match="cls_token"):
        dinov2_model_name({"other.weight": torch.zeros(1)})


@pytest.mark.parametrize("resolution", [56])  # 224 (the default) runs in tools/tests/test_eval_dino.py
def test_features_equal_timms_model_on_hand_preprocessed_images(checkpoint, resolution):
    path, state = checkpoint
    net = dinov2(path, resolution=resolution)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = net(x)["features"]
    with torch.no_grad():
        want = timm_reference(state, resolution)(by_hand(x, resolution))
    assert got.shape == (3, 384)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-3  # the features see the image
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        dinov2(tmp_path / "missing.pth")
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth.*cls_token"):
        dinov2(tmp_path / "bad.pth")
    net = dinov2(None, model_name="vit_small_patch14_dinov2", resolution=28)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(torch.rand(2, 1, 28, 28))
