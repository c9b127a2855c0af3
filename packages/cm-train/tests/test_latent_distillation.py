"""Text-to-image LoRA distillation end to end on tiny random SD 1.5 / SDXL pipelines (written by the
test, nothing downloaded): each recipe trains a few steps through cm_train, its LoRA loads into the
diffusers pipeline, which with LCMScheduler samples the latents cm_core's LCM sampler gives; resume is
bit-exact; bad inputs give one line."""

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="needs diffusers (pip install 'cm-train[diffusers]')")
pytest.importorskip("peft", reason="needs peft (pip install 'cm-train[diffusers]')")

import cm_core  # noqa: E402
import cm_train  # noqa: E402
from cm_core import discrete as D  # noqa: E402
from cm_nets.diffusers_net import DiffusersNet  # noqa: E402
from cm_nets.testing_diffusers import TINY_RESOLUTION, tiny_sd_pipeline  # noqa: E402
from diffusers.utils import logging as dlog  # noqa: E402
from PIL import Image  # noqa: E402

dlog.set_verbosity_error()
dlog.disable_progress_bar()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"lcm-sdxl-lora": "sdxl", "direct-cm-sdxl-lora": "sdxl", "direct-cm-sd15-lora": "sd"}
CAPTIONS = ["a red square", "a blue circle", "green stripes", "a yellow dot", "dark noise", "a white cross"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": tiny_sd_pipeline(root / "sd"), "sdxl": tiny_sd_pipeline(root / "sdxl", xl=True)}


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    for i, text in enumerate(CAPTIONS):
        h, w = (40, 48) if i % 2 else (48, 36)  # non-square: resized and center-cropped to 32
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(text + "\n")
    return folder


def _config(recipe, pipeline, data, run_dir, *extra):
    kwargs = "{num_original_inference_steps = 5, skip = 1, solver = \"ddim\", guidance_range = [2.0, 4.0], distance = \"huber\", huber_c = 0.001}"
    return cm_train.load_config(
        str(CONFIGS / f"{recipe}.toml"),
        [
            f"model.pipeline={pipeline}", f"data.path={data}", f"data.resolution={TINY_RESOLUTION}",
            f"run.dir={run_dir}", "run.total_steps=2", "run.batch_size=2", "run.batch_per_rank=0",
            "model.pipeline_dtype=fp32", "precision.mode=fp32", "model.lora={rank = 4, alpha = 4}",
            "model.gradient_checkpointing=false", f"objective.kwargs={kwargs}", "checkpoint.every=1",
            "log.sample_every=0", "log.sample_count=2", "log.progress=false", "optim.lr=1e-2", *extra,
        ],
    )  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_trains_and_its_lora_reproduces_our_samples_in_diffusers(recipe, pipelines, captions, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = RECIPES[recipe]
    lines = []
    result = cm_train.run(_config(recipe, pipelines[kind], captions, tmp_path / "run"), log=lines.append)
    assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
    assert any("LoRA rank 4" in line for line in lines)
    assert len(result["samples"]) == 2 and all(Path(p).is_file() for p in result["samples"])  # 1- and 4-step grids
    lora = tmp_path / "run" / "lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    # the trained LoRA (our checkpoint) and the exported one agree; it moved away from the teacher
    net = DiffusersNet.load(pipelines[kind], lora={"rank": 4, "alpha": 4})
    networks, _, _ = cm_train.load_checkpoint(result["checkpoint"])
    net.load_state_dict(networks["net"])
    assert any(v.abs().max() > 0 for k, v in net.state_dict().items() if "lora_B" in k)
    f = cm_core.LatentConsistencyFunction(net)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(pipelines[kind], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora))
    z = torch.randn(2, *net.latent_shape, generator=torch.Generator().manual_seed(3))
    prompts = CAPTIONS[:2]
    ref = pipe(prompts, num_inference_steps=2, guidance_scale=1.0, latents=z.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(4), height=TINY_RESOLUTION, width=TINY_RESOLUTION).images  # fmt: skip
    ours = D.lcm_sample(f, f.vp, z.clone(), D.lcm_inference_timesteps(2), generator=torch.Generator().manual_seed(4),
                        **f.encode(prompts))  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_resume_is_bit_exact(pipelines, captions, tmp_path):
    straight = cm_train.run(_config("lcm-sdxl-lora", pipelines["sdxl"], captions, tmp_path / "a", "run.total_steps=3"), log=lambda m: None)
    cm_train.run(_config("lcm-sdxl-lora", pipelines["sdxl"], captions, tmp_path / "b", "run.total_steps=1"), log=lambda m: None)
    resumed = cm_train.run(
        _config("lcm-sdxl-lora", pipelines["sdxl"], captions, tmp_path / "b", "run.total_steps=3", "run.allow_config_change=true"),
        log=lambda m: None,
    )
    a, _, _ = cm_train.load_checkpoint(straight["checkpoint"])
    b, _, _ = cm_train.load_checkpoint(resumed["checkpoint"])
    assert a["net"].keys() == b["net"].keys()
    for k in a["net"]:
        assert torch.equal(a["net"][k], b["net"][k]), k


def test_bad_inputs_give_one_clear_line(pipelines, captions, tmp_path):
    def fails(match, *extra, pipeline=None, data=None):
        cfg = _config("direct-cm-sd15-lora", pipeline or pipelines["sd"], data or captions, tmp_path / "r", *extra)
        with pytest.raises(cm_train.ConfigError, match=match) as info:
            cm_train.run(cfg, log=lambda m: None)
        assert "\n" not in str(info.value)

    fails("does not exist", pipeline=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    fails("not a diffusers pipeline folder", pipeline=tmp_path / "empty")
    fails("rank must be a positive integer", "model.lora={rank = 0}")
    fails("rank must be a positive integer", "model.lora={rank = -2}")
    fails("set ema = \\[\\]", "ema=[{kind = \"constant\", decay = 0.99}]")
    fails("objective.name", "objective.name=ict", "objective.kwargs={}")
    fails("has no captions", "data.source=digits", "data.path=", "data.resolution=0")


@pytest.mark.distributed
def test_two_torchrun_ranks_train_the_same_lora_as_one(pipelines, captions, tmp_path):
    """The global batch of 2 as one rank accumulating 2 micro-batches of 1, or two ranks of 1 each
    (gloo): every draw is keyed by (step, chunk), so the LoRA weights agree to fp32 rounding."""
    import json
    import os
    import subprocess
    import sys

    def config(name):
        cfg = _config("direct-cm-sd15-lora", pipelines["sd"], captions, tmp_path / name, "run.batch_per_rank=1",
                      "checkpoint.every=0", "log.sample_count=0")  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cm_train.config_to_dict(cfg)))
        return cfg, path

    cfg, _ = config("one")
    one = cm_train.run(cfg, log=lambda m: None)
    _, path = config("two")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cm_train",
           "--config", str(path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _, _ = cm_train.load_checkpoint(one["checkpoint"])
    b, _, _ = cm_train.load_checkpoint(cm_train.latest_checkpoint(tmp_path / "two"))
    assert a["net"].keys() == b["net"].keys() and any(v.abs().max() > 0 for k, v in b["net"].items() if "lora_B" in k)
    for k in a["net"]:
        torch.testing.assert_close(a["net"][k], b["net"][k], rtol=1e-4, atol=1e-6)
