"""`cm t2i` on a tiny random SD 1.5 pipeline (written by the test): cache latents, train a LoRA
through `cm train`, sample teacher and students from one noise file, score them. The teacher's
samples equal diffusers' DDIM pipeline and the 1-NFE student equals the LoRA pipeline with
LCMScheduler, from the same noise."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers", reason="needs diffusers (pip install 'cm-nets[diffusers]')")
pytest.importorskip("peft", reason="needs peft (pip install 'cm-nets[diffusers]')")

from cm_cli.main import cli  # noqa: E402
from cm_nets.testing_diffusers import TINY_RESOLUTION, tiny_sd_pipeline  # noqa: E402
from diffusers.utils import logging as dlog  # noqa: E402
from PIL import Image  # noqa: E402

dlog.set_verbosity_error()
dlog.disable_progress_bar()
RECIPE = Path(__file__).resolve().parents[2] / "packages" / "cm-train" / "configs" / "direct-cm-sd15-lora.toml"
PROMPTS = ["a red square", "a blue circle", "green stripes", "a yellow dot"]


def cm(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def fails(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), result.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = tiny_sd_pipeline(root / "sd15")
    data = root / "captions"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(text)
    latents = root / "latents"
    ok(cm("t2i", "cache-latents", pipe, data, "--out", latents, "--batch-size", 2))
    kwargs = '{num_original_inference_steps = 5, guidance_range = [2.0, 4.0]}'
    run = root / "run"
    ok(cm("train", RECIPE, f"model.pipeline={pipe}", "data.source=latents", f"data.path={latents}",
          f"data.resolution={TINY_RESOLUTION}", f"run.dir={run}", "run.total_steps=2", "run.batch_size=2",
          "run.batch_per_rank=0", "model.pipeline_dtype=fp32", "precision.mode=fp32", "model.lora={rank = 4}",
          f"objective.kwargs={kwargs}", "log.sample_every=0", "log.sample_count=2", "log.progress=false",
          "optim.lr=1e-2"))  # fmt: skip
    noise = root / "noise.pt"
    ok(cm("eval", "make-noise", "--shape", f"4,{TINY_RESOLUTION // 2},{TINY_RESOLUTION // 2}", "--num", 4, "--out", noise))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "pipe": pipe, "run": run, "noise": noise, "prompts": prompts, "latents": latents}


def test_sample_matches_diffusers_and_eval_writes_metrics(setup, tmp_path):
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline

    out = tmp_path / "samples"
    ok(cm("t2i", "sample", setup["run"], "--prompts", setup["prompts"], "--noise", setup["noise"], "--out", out,
          "--nfe", "1,2", "--teacher-points", 5, "--guidance", 3.0, "--batch-size", 3))  # fmt: skip
    for name in ("teacher", "nfe-1", "nfe-2"):
        assert len(list((out / name).glob("*.png"))) == 4
    teacher = np.load(out / "teacher.npz")
    student1 = np.load(out / "nfe-1.npz")
    assert teacher["arr_0"].shape == (4, TINY_RESOLUTION, TINY_RESOLUTION, 3) and teacher["arr_0"].dtype == np.uint8
    z = torch.load(setup["noise"], weights_only=True)["noise"]
    pipe = StableDiffusionPipeline.from_pretrained(setup["pipe"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    ref = pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, latents=z.clone(), output_type="latent",
               height=TINY_RESOLUTION, width=TINY_RESOLUTION).images  # fmt: skip
    np.testing.assert_allclose(teacher["latents"], ref.numpy(), rtol=1e-5, atol=2e-4)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(setup["run"] / "lora"))
    ref1 = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent",
                height=TINY_RESOLUTION, width=TINY_RESOLUTION).images  # fmt: skip
    np.testing.assert_allclose(student1["latents"], ref1.numpy(), rtol=1e-5, atol=2e-4)
    # batch size does not change a sample (per-image re-noising)
    out2 = tmp_path / "again"
    ok(cm("t2i", "sample", setup["run"], "--prompts", setup["prompts"], "--noise", setup["noise"], "--out", out2,
          "--nfe", "2", "--no-teacher", "--batch-size", 4))  # fmt: skip
    np.testing.assert_allclose(np.load(out2 / "nfe-2.npz")["latents"], np.load(out / "nfe-2.npz")["latents"], rtol=1e-5, atol=1e-5)

    # FID (random Inception weights: the plumbing, not the number), CLIP and aesthetic scores (a tiny
    # random CLIP with ViT-L/14's 768-d embedding, registered with open_clip here; a random predictor)
    import cm_eval

    inception = tmp_path / "inception.pth"
    torch.save(cm_eval.inception_fid(None).state_dict(), inception)
    extra = ["--inception", inception]
    open_clip = pytest.importorskip("open_clip", reason="CLIP metrics need open_clip")
    arch = "cm-t2i-test-clip"
    (tmp_path / f"{arch}.json").write_text(json.dumps({
        "embed_dim": 768, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))  # fmt: skip
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.save(open_clip.create_model(arch).state_dict(), tmp_path / "clip.bin")
    from cm_eval.clip_metrics import AestheticPredictor

    predictor = AestheticPredictor()
    torch.save(predictor.state_dict(), tmp_path / "aesthetic.pth")
    extra += ["--clip-arch", arch, "--clip-weights", tmp_path / "clip.bin", "--aesthetic", tmp_path / "aesthetic.pth"]
    result = ok(cm("t2i", "eval", out, *extra))
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for name in ("nfe-1", "nfe-2"):
        assert np.isfinite(metrics[name]["fid_vs_teacher"]) and metrics[name]["fid_vs_teacher"] >= 0
    for name in ("teacher", "nfe-1", "nfe-2"):
        assert 0 <= metrics[name]["clip_score"] <= 100 and np.isfinite(metrics[name]["aesthetic"])
    expected = float(((student1["latents"].astype(np.float64) - teacher["latents"]) ** 2).mean())
    assert metrics["nfe-1"]["ode_mse"] == pytest.approx(expected, rel=1e-12)
    assert "ode_mse" in result.output and (out / "report.html").is_file()
    logged = [json.loads(line) for line in (setup["run"] / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["t2i/nfe-2/ode_mse"] == metrics["nfe-2"]["ode_mse"] and logged[-1]["step"] == 2


def test_bad_inputs_give_one_line(setup, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args = ["t2i", "sample", setup["run"], "--noise", setup["noise"], "--out", tmp_path / "o"]
    fails(cm(*args, "--prompts", empty), str(empty), "no prompts")
    three = tmp_path / "three.txt"
    three.write_text("a\nb\nc\n")
    fails(cm(*args, "--prompts", three), "3 prompts", "4 noise")
    fails(cm("t2i", "sample", tmp_path, "--prompts", setup["prompts"], "--noise", setup["noise"], "--out", tmp_path / "o"),
          "neither a cm-train run folder")  # fmt: skip
    fails(cm("t2i", "cache-latents", tmp_path / "nope", setup["root"] / "captions", "--out", tmp_path / "c"), "does not exist")
    fails(cm("t2i", "eval", tmp_path), "samples.json")
    fails(cm("sample", setup["run"], "--num", 2, "--out", tmp_path / "s.npz"), "text-to-image LoRA run", "cm t2i sample")
