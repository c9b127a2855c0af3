"""`cm eval fd-dino` end to end through the real timm: a DINOv2 ViT-S/14 weight file written by
the test (random weights in Meta's layout; nothing downloaded), features checked against timm's
own model on hand-preprocessed images, the distance against numpy statistics of those features."""

import json

import cm_eval
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from cm_cli.main import cli

timm = pytest.importorskip("timm", reason="DINOv2 needs timm: pip install 'cm-eval[dino]'")


def test_fd_dino_with_a_real_timm_vit(tmp_path):
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    meta = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518)
    state = {**meta.state_dict(), "mask_token": torch.zeros(1, 384)}
    for key in state:
        if key.endswith(("ls1.gamma", "ls2.gamma")):
            state[key] = torch.full_like(state[key], 0.5)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")

    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    real = rng.integers(0, 160, (5, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=fake)
    np.savez(tmp_path / "ref.npz", arr_0=real)

    result = CliRunner().invoke(
        cli,
        ["eval", "fd-dino", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
         "--dino", str(tmp_path / "dinov2_vits14_pretrain.pth"), "--json", str(tmp_path / "fd.json")],
        prog_name="cm",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    got = json.loads((tmp_path / "fd.json").read_text())

    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224)
    vit.load_state_dict(checkpoint_filter_fn(dict(state), vit))
    vit.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def stats(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False).clamp(0, 1)
        with torch.no_grad():
            f = vit((x - mean) / std).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    want = cm_eval.frechet_distance(*stats(fake), *stats(real))
    assert got["num_images"] == 4
    assert got["fd_dinov2"] == pytest.approx(want, rel=1e-4)
    assert want > 0
