"""CLIP score and the LAION aesthetic score (cm_eval.clip_metrics) through the real open_clip, on a
tiny random CLIP registered by the test (nothing downloaded): preprocessing against torchvision's
rule and a hand computation, scores against float64 computations with the raw open_clip model."""

import json

import pytest
import torch
import torch.nn.functional as F
from cm_eval.clip_metrics import AestheticPredictor, aesthetic_score, clip_score, load_aesthetic, load_clip

open_clip = pytest.importorskip("open_clip", reason="CLIP metrics need open_clip: pip install 'cm-eval[clip]'")

ARCH = "cm-test-tiny-clip"
# embed_dim 768 as OpenAI's ViT-L/14, so that the published aesthetic predictor's shapes apply.
CONFIG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
PROMPTS = ["a red cube", "a photo of a cat on a sofa", "two dogs", "an astronaut riding a horse", "x", "sunset"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(weights path, the state dict) of the tiny CLIP, registered with open_clip under ARCH."""
    d = tmp_path_factory.mktemp("clip")
    (d / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(d / f"{ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    with torch.no_grad():  # weights no fresh init can equal: a model built without loading them would fail
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, d / "open_clip_pytorch_model.bin")
    return d / "open_clip_pytorch_model.bin", state


def raw_model64(state):
    model = open_clip.create_model(ARCH).double().eval()
    model.load_state_dict(state)
    return model


def preprocess64(images, size, top, left, s=32):
    """open_clip's eval transform written out: bicubic (antialiased) resize to ``size``, crop, normalize."""
    x = F.interpolate(images.double(), size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x[..., top : top + s, left : left + s] - MEAN) / STD


def images(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_preprocessing_matches_open_clips_resize_and_crop(clip):
    model = load_clip(ARCH, clip[0])
    assert model.image_size == (32, 32)
    # shorter side → 32, longer int(32·long/short); crop offsets round((size − 32) / 2), as torchvision
    cases = {
        (40, 50): ((32, 40), 0, 4),
        (47, 40): ((37, 32), 2, 0),
        (64, 64): ((32, 32), 0, 0),
        (32, 45): ((32, 45), 0, 6),
    }
    for (h, w), (size, top, left) in cases.items():
        x = images(2, h, w)
        got = model.preprocess(x)
        assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
        # atol: float32 resampling against float64 (a wrong size or offset is off by ~0.1 or more)
        torch.testing.assert_close(got.double(), preprocess64(x, size, top, left), atol=2e-5, rtol=0)
    x = images(2, 32, 32)
    torch.testing.assert_close(model.preprocess(x).double(), (x.double() - MEAN) / STD, atol=1e-6, rtol=0)

    tv = pytest.importorskip("torchvision.transforms.v2", reason="torchvision cross-check")
    for h, w in cases:
        x = images(1, h, w, seed=1)
        ref = tv.Compose([tv.Resize(32, interpolation=tv.InterpolationMode.BICUBIC, antialias=True), tv.CenterCrop(32)])
        want = (ref(x).clamp(0, 1).double() - MEAN) / STD
        torch.testing.assert_close(model.preprocess(x).double(), want, atol=2e-5, rtol=0)


def test_clip_score_against_float64(clip, caplog):
    path, state = clip
    model = load_clip(ARCH, path)
    assert "initialized randomly" not in caplog.text  # open_clip's line does not apply: the weights are loaded
    x = images(6, 40, 48, seed=2)
    # every image with every prompt (36 pairs, batches of 5 with a remainder): both signs of cos occur
    ii, pp = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    ii, pp = ii.flatten(), pp.flatten()
    got = clip_score(model, x[ii], [PROMPTS[j] for j in pp], batch_size=5)

    raw = raw_model64(state)
    with torch.no_grad():
        img = raw.encode_image(preprocess64(x, (32, 38), 0, 3))
        txt = raw.encode_text(open_clip.get_tokenizer(ARCH)(PROMPTS))
    cos = (img / img.norm(dim=-1, keepdim=True)) @ (txt / txt.norm(dim=-1, keepdim=True)).T  # [6 images, 6 prompts]
    want = 100 * cos.flatten().clamp(min=0)
    assert (cos < 0).any() and (cos > 0).any(), cos  # the clamp is exercised
    assert got.shape == (36,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)
    assert want.max() > 1  # the scores are not all ~0, so the comparison above means something


def test_load_clip_errors(clip, tmp_path):
    path, state = clip
    with pytest.raises(FileNotFoundError) as e:
        load_clip("ViT-L-14", tmp_path / "missing.bin")
    msg = str(e.value)
    assert "\n" not in msg and "missing.bin" in msg and "open_clip_pytorch_model.bin" in msg and "ViT-L-14" in msg

    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        load_clip("no-such-arch", path)
    with pytest.raises(ValueError, match="not 'hf-hub:"):
        load_clip("hf-hub:laion/CLIP-ViT-L-14", path)

    partial = tmp_path / "partial.bin"
    torch.save({k: v for k, v in state.items() if not k.startswith("visual.")}, partial)
    with pytest.raises(ValueError, match="partial.bin does not fit open_clip .*missing"):
        load_clip(ARCH, partial)
    wrong = tmp_path / "wrong_shape.bin"
    torch.save({**state, "text_projection": torch.zeros(64, 512)}, wrong)
    with pytest.raises(ValueError, match="wrong_shape.bin does not fit") as e:
        load_clip(ARCH, wrong)
    assert "\n" not in str(e.value)

    model = load_clip(ARCH, path)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        clip_score(model, images(2, 32, 32) * 2 - 1, PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(model, images(2, 32, 32), PROMPTS[:3])


def _predictor_state(seed=0):
    """Random weights in the published file's layout (Linear at Sequential indices 0, 2, 4, 6, 7)."""
    g = torch.Generator().manual_seed(seed)
    dims = {0: (768, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}
    state = {}
    for i, (fan_in, fan_out) in dims.items():
        state[f"layers.{i}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        state[f"layers.{i}.bias"] = 0.1 * torch.randn(fan_out, generator=g)
    state["layers.7.bias"] += 5.0  # a rating around the middle of the 1–10 scale
    return state


def test_aesthetic_score_against_a_float64_mlp(clip, tmp_path):
    path, clip_state = clip
    state = _predictor_state()
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    predictor = load_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert isinstance(predictor, AestheticPredictor) and not predictor.training

    model = load_clip(ARCH, path)
    x = images(5, 44, 40, seed=3)
    got = aesthetic_score(model, predictor, x, batch_size=2)

    raw = raw_model64(clip_state)
    with torch.no_grad():
        emb = raw.encode_image(preprocess64(x, (35, 32), 2, 0))
    h = emb / emb.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # no activations: the published predictor is linear
        h = h @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    want = h.squeeze(-1)
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert want.std() > 1e-3  # the images get different scores

    from safetensors.torch import save_file

    save_file(state, tmp_path / "aesthetic.safetensors")
    again = aesthetic_score(model, load_aesthetic(tmp_path / "aesthetic.safetensors"), x)
    torch.testing.assert_close(again, got)


def test_load_aesthetic_errors(tmp_path):
    state = _predictor_state()
    with pytest.raises(FileNotFoundError, match="nope.pth.*sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_aesthetic(tmp_path / "nope.pth")

    # the repository's ReLU variant has its Linear layers at other indices
    relu = {k.replace("layers.2.", "layers.3."): v for k, v in state.items()}
    torch.save(relu, tmp_path / "relu.pth")
    with pytest.raises(ValueError) as e:
        load_aesthetic(tmp_path / "relu.pth")
    msg = str(e.value)
    assert "\n" not in msg and "relu.pth" in msg and "layers.2.weight" in msg and "layers.3.weight" in msg

    torch.save({**state, "layers.0.weight": torch.zeros(1024, 512)}, tmp_path / "b32.pth")
    with pytest.raises(ValueError, match=r"b32.pth: layers.0.weight .*\[1024, 512\], expected .*\[1024, 768\]"):
        load_aesthetic(tmp_path / "b32.pth")

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ValueError, match="bad.safetensors: not a LAION aesthetic predictor state dict") as e:
        load_aesthetic(tmp_path / "bad.safetensors")
    assert "\n" not in str(e.value)

    torch.save({**state, "extra": Payload()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="pickled.pth: not a LAION aesthetic predictor state dict readable"):
        load_aesthetic(tmp_path / "pickled.pth")
