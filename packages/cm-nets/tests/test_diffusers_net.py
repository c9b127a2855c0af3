"""cm_nets.DiffusersNet against diffusers' own pipelines, on tiny random SD 1.5- and SDXL-shaped
pipelines written by the test (cm_nets.testing_diffusers): text conditioning, the guided teacher ODE
solve, the VAE, and LoRA weights that load into the pipeline and sample the same latents as
cm_core's LCM sampler."""

import pytest
import torch

pytest.importorskip("diffusers", reason="needs diffusers (pip install 'cm-nets[diffusers]')")
pytest.importorskip("peft", reason="needs peft (pip install 'cm-nets[diffusers]')")

import cm_core  # noqa: E402
from cm_core import discrete as D  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as dlog  # noqa: E402

from cm_nets.diffusers_net import DiffusersNet, pipeline_kind  # noqa: E402
from cm_nets.testing_diffusers import TINY_RESOLUTION, tiny_sd_pipeline  # noqa: E402

dlog.set_verbosity_error()
dlog.disable_progress_bar()
PROMPTS = ["a red cat", "two dogs on grass"]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def folder(request, tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp(request.param), xl=request.param == "sdxl")


def _pipe(folder, scheduler_cls=None, **sched_kw):
    cls = StableDiffusionXLPipeline if pipeline_kind(folder) == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **sched_kw)
    return pipe


def _noise(seed=1):
    return torch.randn(2, 4, TINY_RESOLUTION // 2, TINY_RESOLUTION // 2, generator=torch.Generator().manual_seed(seed))


def test_text_embeddings_equal_the_pipelines_encode_prompt(folder):
    net = DiffusersNet.load(folder)
    pipe = _pipe(folder)
    emb = net.encode_text(PROMPTS)
    null = net.null_text(emb)
    if net.kind == "sdxl":
        pe, ne, pp, npool = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
        torch.testing.assert_close(emb["text_embeds"], pp)
        torch.testing.assert_close(null["text_embeds"], npool)
        res = TINY_RESOLUTION
        assert emb["time_ids"].tolist() == [[res, res, 0, 0, res, res]] * 2
    else:
        pe, ne = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(emb["encoder_hidden_states"], pe)
    torch.testing.assert_close(null["encoder_hidden_states"], ne)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_guided_teacher_ode_solve_equals_the_pipeline(folder, guidance):
    """DDIM on LCM's grid (k − 1 … 999, then to ᾱ_0) is diffusers' DDIM with "trailing" spacing."""
    net = DiffusersNet.load(folder)
    f = cm_core.LatentConsistencyFunction(net)
    pipe = _pipe(folder, DDIMScheduler, timestep_spacing="trailing")
    z = _noise()
    ref = pipe(PROMPTS, num_inference_steps=5, guidance_scale=guidance, latents=z.clone(), output_type="latent",
               height=TINY_RESOLUTION, width=TINY_RESOLUTION).images  # fmt: skip
    emb = f.encode(PROMPTS)
    ts = D.lcm_grid(1000, 5).flip(0).tolist() + [0]
    x = z.clone()
    for t, tp in zip(ts, ts[1:]):
        x = D.solver_step(f.vp, lambda a, b: f.teacher_x0_eps(a, b, emb, guidance), x,
                          torch.full((2,), t), torch.full((2,), tp))  # fmt: skip
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=2e-4)


def test_lora_round_trips_into_diffusers_and_reproduces_lcm_samples(folder, tmp_path):
    net = DiffusersNet.load(folder, lora={"rank": 4, "alpha": 8})
    f = cm_core.LatentConsistencyFunction(net)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(net.state_dict()) == {n for n, _ in net.named_parameters() if "lora_" in n}
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for n, p in net.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    out = net.save_lora(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = _pipe(folder, LCMScheduler)
    pipe.load_lora_weights(str(out))
    z = _noise(2)
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, latents=z.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(7), height=TINY_RESOLUTION, width=TINY_RESOLUTION).images  # fmt: skip
    emb = f.encode(PROMPTS)
    ours = D.lcm_sample(f, f.vp, z.clone(), D.lcm_inference_timesteps(2), generator=torch.Generator().manual_seed(7), **emb)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    with net.adapters_disabled():  # the adapter matters: the base model samples something else
        base = D.lcm_sample(f, f.vp, z.clone(), D.lcm_inference_timesteps(2), generator=torch.Generator().manual_seed(7), **emb)
    assert (base - ours).abs().max() > 1e-2
    # our own checkpoint format: the LoRA state dict loads back exactly
    again = DiffusersNet.load(folder, lora={"rank": 4, "alpha": 8})
    again.load_state_dict(net.state_dict())
    for (k, a), (_, b) in zip(sorted(net.state_dict().items()), sorted(again.state_dict().items())):
        assert torch.equal(a, b), k
    with pytest.raises(RuntimeError, match="lora rank"):
        DiffusersNet.load(folder, lora={"rank": 2}).load_state_dict(net.state_dict())


def test_vae_round_trip_uses_the_scaling_factor(folder):
    net = DiffusersNet.load(folder)
    x = torch.rand(1, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=torch.Generator().manual_seed(3)) * 2 - 1
    z = net.encode_images(x)
    ref = net.vae.encode(x).latent_dist.mean * net.vae.config.scaling_factor
    torch.testing.assert_close(z, ref)
    assert z.shape == (1, *net.latent_shape)
    torch.testing.assert_close(net.decode_latents(z), net.vae.decode(ref / net.vae.config.scaling_factor).sample.clamp(-1, 1))


def test_bad_folders_and_lora_settings_give_one_clear_line(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersNet.load(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        DiffusersNet.load(tmp_path / "plain")
    for rank in (0, -3, 2.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            DiffusersNet.load(folder, lora={"rank": rank})
    with pytest.raises(ValueError, match="match no module"):
        DiffusersNet.load(folder, lora={"rank": 2, "targets": ["not_a_layer"]})
