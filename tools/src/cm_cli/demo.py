"""The end-to-end demo on the embedded digits (scikit-learn's 8×8 handwritten digits, offline).

    run_demo("demo-out")            # about 5 minutes on 2 CPU cores;  quick=True: under a minute

1. trains an EDM diffusion teacher, tunes it into a consistency model with ECT (Geng et al. 2024),
   trains an iCT model from scratch (Song & Dhariwal 2023), fine-tunes the ECT model into a
   bidirectional CM (BCM, Li et al. 2024), distils the teacher with sCD (continuous-time, TrigFlow;
   Lu & Song 2025) and trains MeanFlow from scratch (Geng et al. 2025);
2. samples every model at 1, 2 and 4 NFE (sCD and MeanFlow at 1 and 2) and the teacher with Heun
   (3 … 35 NFE) from the same seeds, so every row starts from the same noise;
3. scores FD-digits (cm-eval's shipped classifier features against all 1,797 digits), the class
   accuracy of the conditional samples, and the ODE solving error: the MSE to the teacher's
   159-NFE Heun solution from the same noise;
4. shows zero-shot inpainting, 2× super-resolution and noise interpolation with the ECT model,
   and BCM inversion + reconstruction of held-out digits;
5. writes ``report.html`` (grids, editing results, plots, tables), ``report.json`` and returns
   the table.

Everything runs in a temporary folder beside ``out_dir`` that replaces it only when complete, so
an interrupted demo never leaves a half-written report or destroys the previous one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cm_core
import cm_eval
import torch
from cm_nets import files

from cm_train import load_config, load_trained, run

__all__ = ["DemoBudget", "FULL", "QUICK", "run_demo"]


@dataclass(frozen=True)
class DemoBudget:
    teacher_steps: int
    ect_steps: int
    ict_steps: int
    bcm_steps: int
    scd_steps: int
    meanflow_steps: int
    eval_samples: int  # per row of the table
    search_samples: int  # for the 2-step σ search (other seeds than the evaluation's)
    search_iters: int
    hidden: int  # width of the mlp-digits network
    batch_size: int = 128
    reference_steps: int = 80  # the ODE-error reference: Heun on a Karras grid of this many points


# Sized for ≤ 10 min with the install on 2 CPU cores, one thread: ~31 ms per EDM step, ~35 per ECT step,
# ~50 per iCT step, ~80 per BCM step, ~42 per sCD and ~38 per MeanFlow step (JVPs; see the stage
# times in report.json).
FULL = DemoBudget(
    teacher_steps=3000,
    ect_steps=2000,
    ict_steps=2200,
    bcm_steps=800,
    scd_steps=1500,
    meanflow_steps=1500,
    eval_samples=1000,
    search_samples=500,
    search_iters=5,
    hidden=256,
)
QUICK = DemoBudget(  # about a minute: a smoke test of the whole path, not the documented numbers
    teacher_steps=800,
    ect_steps=400,
    ict_steps=500,
    bcm_steps=120,
    scd_steps=300,
    meanflow_steps=300,
    eval_samples=300,
    search_samples=200,
    search_iters=2,
    hidden=128,
    batch_size=64,
    reference_steps=40,
)

FOUR_STEP = [80.0, 2.0, 0.8, 0.3]  # a fixed 4-step schedule for every consistency model
HEUN_STEPS = [2, 3, 5, 18]
# BCM inversion → reconstruction recipes: (what, σ up from the data, σ down to the data).
INVERSIONS = [
    ("to σ=80 and back, 1+1 NFE", (0.07, 80.0), (80.0, 0.002)),
    ("to σ=80 and back via σ=5, 2+2 NFE", (0.07, 5.0, 80.0), (80.0, 5.0, 0.002)),
    ("to σ=80 via σ=15 (BCM's recipe), back in 1 jump", (0.07, 15.0, 80.0), (80.0, 0.002)),
    ("only to σ=2 and back, 1+1 NFE", (0.07, 2.0), (2.0, 0.002)),
]  # teacher: EDM's grid with k steps = 2k − 1 NFE (18 → 35)


def _config(out: Path, name: str, steps: int, budget: DemoBudget, *, objective: dict, model: dict, lr: float,
            decay: str = "none"):
    return load_config(
        {
            "run": {
                "dir": str(out / "runs" / name),
                "total_steps": steps,
                "batch_size": budget.batch_size,
                "threads": torch.get_num_threads(),  # the demo's count (run_demo), not cm-train's own choice
            },
            "data": {"source": "digits", "conditional": True},
            "model": {"preset": "mlp-digits", "c_noise": "edm", **model},
            "objective": objective,
            "optim": {"name": "adam", "lr": lr, "warmup_steps": min(100, steps // 4), "decay": decay},
            "ema": [{"kind": "power", "sigma_rel": 0.1, "name": "ema"}],
            "checkpoint": {"every": 0, "keep_last": 1},
            "log": {"every": max(steps // 40, 1), "sample_every": 0, "sample_count": 100},
        }
    )


class _Stage:
    """Wall time per stage, for the report."""

    def __init__(self, log):
        self.log, self.times = log, {}

    def __call__(self, name: str):
        stage = self

        class _Timer:
            def __enter__(self):
                stage.log(f"[demo] {name} …")
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                stage.times[name] = time.perf_counter() - self.t0
                if exc[0] is None:
                    stage.log(f"[demo] {name}: {stage.times[name]:.0f} s")

        return _Timer()


def _loss_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    steps, losses = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    return steps, losses


# What the demo imports beyond cm's own dependencies: checked before any training (minutes).
NEEDS = {"sklearn": ("scikit-learn", "the embedded digits"), "matplotlib": ("matplotlib", "the report's plots")}


def check_needs() -> None:
    """ImportError naming every missing optional package and the pip command, before any work."""
    import importlib.util

    missing = [(dist, why) for module, (dist, why) in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        what = ", ".join(f"{dist} ({why})" for dist, why in missing)
        raise ImportError(f"cm demo needs {what}: pip install {' '.join(d for d, _ in missing)}")


# One name per model in every plot legend (report.json keeps its row names).
DISPLAY = {"teacher": "EDM teacher", "ect": "ECT", "ECT": "ECT", "ict": "iCT", "ICT": "iCT", "bcm": "BCM", "BCM": "BCM",
           "scd": "sCD", "sCD": "sCD", "meanflow": "MeanFlow", "MeanFlow": "MeanFlow"}  # fmt: skip


def run_demo(
    out_dir="demo-out", *, quick: bool = False, overwrite: bool = False, threads: int | None = 1, log=print
) -> dict:
    """Train, sample, evaluate, edit, and write ``out_dir/report.html``. Returns
    ``{"report", "json", "table": [row dicts], "text": printable table, "seconds"}``.

    ``threads=1`` (default) makes every number repeat bit-for-bit: with 2 CPU threads some
    kernels sum in a run-dependent order and iCT amplifies the last-bit differences (two threads
    are ~20 % faster). ``None`` keeps torch's setting."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (cm demo --overwrite) to replace it")
    check_needs()
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for torch's setting), got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(out, quick, overwrite, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(out: Path, quick: bool, overwrite: bool, log) -> dict:
    budget = QUICK if quick else FULL
    t_start = time.perf_counter()
    with files.atomic_dir(out) as work:  # replaces out only once the new report is complete
        result = _run(work, budget, quick, log)
        result["seconds"] = time.perf_counter() - t_start
        _finish(work, result)
    result["report"] = str(out / "report.html")
    result["json"] = str(out / "report.json")
    log(f"[demo] done in {result['seconds']:.0f} s; report: {result['report']}")
    return result


def _finish(work: Path, result: dict) -> None:
    cm_eval.write_report(
        work / "report.json",
        {k: v for k, v in result.items() if k not in ("text", "sections")} | {"seconds": result["seconds"]},
    )
    intro = (
        f"Built by `cm demo{' --quick' if result['quick'] else ''}` in {result['seconds']:.0f} s on "
        f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}. Data: scikit-learn's 1,797 "
        "handwritten 8×8 digits (ships offline), class-conditional. All numbers below are measured by this run."
    )
    cm_eval.html_report(
        work / "report.html", title="cm demo: consistency models on digits", intro=intro, sections=result["sections"]
    )


def _run(work: Path, budget: DemoBudget, quick: bool, log) -> dict:
    stage = _Stage(log)
    runs = {}
    mlp = {"num_classes": 10, "hidden": budget.hidden}

    # ---- 1. training ------------------------------------------------------------------------
    with stage("train the EDM teacher"):
        cfg = _config(
            work,
            "teacher",
            budget.teacher_steps,
            budget,
            objective={"name": "edm", "kwargs": {}},
            model={"overrides": mlp},
            lr=2e-3,
        )
        runs["teacher"] = run(cfg, log=log)
    teacher_weights = Path(runs["teacher"]["checkpoint"]) / "ema-ema.safetensors"
    with stage("ECT: tune the teacher into a consistency model"):
        cfg = _config(
            work,
            "ect",
            budget.ect_steps,
            budget,
            objective={"name": "ect", "kwargs": {"double_steps": max(budget.ect_steps // 4, 1)}},
            model={"overrides": mlp, "init": str(teacher_weights), "boundary": "edm"},
            lr=2e-4,
        )
        runs["ect"] = run(cfg, log=log)
    with stage("iCT: train a consistency model from scratch"):
        cfg = _config(
            work,
            "ict",
            budget.ict_steps,
            budget,
            objective={"name": "ict", "kwargs": {"s0": 10, "s1": 160}},
            model={"overrides": mlp},
            lr=5e-4,
        )
        runs["ict"] = run(cfg, log=log)
    with stage("BCM: fine-tune the ECT model to jump both ways"):
        cfg = _config(
            work,
            "bcm",
            budget.bcm_steps,
            budget,
            objective={"name": "bcm", "kwargs": {}},
            model={
                "overrides": dict(mlp, bcm=True),
                "init": str(Path(runs["ect"]["checkpoint"]) / "ema-ema.safetensors"),
            },
            lr=2e-4,
        )
        runs["bcm"] = run(cfg, log=log)
    # Continuous-time models: their time input goes through jvp, so their networks take a
    # low-frequency time embedding (mlp-digits' noise_scale 10 on TrigFlow's t, sCM's point);
    # MeanFlow's second time input (t − r) is the BCM end-time embedding. The sCD student starts
    # fresh (the teacher's embedding is high-frequency: 1000·ln σ/4), so its tangent warm-up spans
    # the run (r = step/steps: the diffusion term first, the full tangent by the end) with a cosine
    # learning rate, a narrower proposal of t (P_std 1.0 instead of 1.4) and tangent normalization
    # c = 1 (the paper's 0.1 normalizes this small model's tangents too hard); on the full budget
    # this gave 2-NFE FD 28.8 where a warm-up over the first fifth at a constant 5e-4 gave 70–80
    # (bench/RESULTS.md, "sCD in the demo": the settings tried).
    with stage("sCD: distil the teacher in continuous time (TrigFlow, sCM)"):
        cfg = _config(
            work,
            "scd",
            budget.scd_steps,
            budget,
            objective={
                "name": "scd",
                "kwargs": {"tangent_warmup": budget.scd_steps, "p_std": 1.0, "tangent_norm_c": 1.0},
            },
            model={"overrides": dict(mlp, noise_scale=10.0), "c_noise": "trig", "teacher": str(teacher_weights)},
            lr=1.5e-3,
            decay="cosine",
        )
        runs["scd"] = run(cfg, log=log)
    with stage("MeanFlow: one-step flow model from scratch"):
        cfg = _config(
            work,
            "meanflow",
            budget.meanflow_steps,
            budget,
            objective={"name": "meanflow", "kwargs": {}},
            model={"overrides": dict(mlp, bcm=True)},
            lr=7e-4,
        )
        runs["meanflow"] = run(cfg, log=log)
    models = {name: load_trained(r["checkpoint"]) for name, r in runs.items()}

    # ---- 2–3. sampling and metrics -----------------------------------------------------------
    n = budget.eval_samples
    seeds = list(range(n))
    labels = torch.arange(n) % 10  # balanced classes; a 10-wide grid shows 0…9 in every row
    shape = models["teacher"].sample_shape
    grids = work / "grids"
    rows, curves = [], {}
    with stage("teacher reference solutions (ODE error)"):
        reference = cm_eval.teacher_solutions(
            models["teacher"].function,
            seeds=seeds,
            shape=shape,
            labels=labels,
            batch_size=500,
            teacher_sigmas=cm_eval.default_teacher_sigmas(budget.reference_steps),
        )

    def score(name, sampler_name, nfe, x, sigmas):
        x = x.clamp(-1, 1)
        row = {
            "model": name,
            "sampler": sampler_name,
            "nfe": nfe,
            "fd_digits": cm_eval.fd_digits(x),
            "class_acc": cm_eval.digits_class_accuracy(x, labels),
            "ode_mse": float((x.double() - reference.double().clamp(-1, 1)).square().mean()),
            "sigmas": [round(float(s), 4) for s in sigmas],
        }
        rows.append(row)
        curves.setdefault(DISPLAY[name], []).append(row)
        path = grids / f"{name}-{nfe}nfe.png"
        cm_eval.save_sample_grid(x[:100], path, ncol=10)
        row["grid"] = str(path.relative_to(work))
        return row

    def sample(model, sigmas, sampler, the_seeds=seeds, the_labels=labels):
        return cm_eval.sample_images(
            model.function,
            seeds=the_seeds,
            shape=shape,
            sigmas=sigmas,
            sampler=sampler,
            labels=the_labels,
            batch_size=500,
        )

    with stage("sample and score the teacher (Heun)"):
        heun = cm_core.get_sampler("heun")  # EDM's Heun: k time steps and a final 0, 2k − 1 NFE
        for k in HEUN_STEPS:
            sig = heun.default_sigmas(k)
            score("teacher", "Heun", heun.nfe(sig), sample(models["teacher"], sig, heun), sig)

    search_seeds = list(range(100_000, 100_000 + budget.search_samples))
    search_labels = torch.arange(budget.search_samples) % 10
    two_step = {}
    for name in ("ect", "ict", "bcm"):
        model = models[name]
        bcm = model.kind == "bcm"
        sampler = cm_core.get_sampler("bcm-ancestral" if bcm else "multistep")
        tail = [model.sigma_min] if sampler.jumps else []  # a BCM chain includes its end σ
        with stage(f"sample and score {name.upper()} at 1, 2, 4 NFE"):
            # The middle σ of 2-step sampling by ternary search on other seeds than the table's.
            search = cm_eval.ternary_search(
                lambda mid, model=model, tail=tail, sampler=sampler: cm_eval.fd_digits(
                    sample(model, [80.0, mid] + tail, sampler, search_seeds, search_labels).clamp(-1, 1)
                ),
                0.1,
                10.0,
                iters=budget.search_iters,
            )
            two_step[name] = search
            for sig in ([80.0], [80.0, search["best"]], FOUR_STEP):
                sig = sig + tail
                label = "BCM ancestral" if bcm else ("1-step" if len(sig) == 1 else "multistep")
                score(name.upper(), label, sampler.nfe(sig), sample(model, sig, sampler), sig)

    for name, label in (("scd", "sCD"), ("meanflow", "MeanFlow")):
        model = models[name]
        spec = cm_core.get_sampler(cm_core.function_kind(model.kind).default_sampler)
        sigma_data = model.function.sigma_data if name == "scd" else None

        def two_step_times(mid_sigma, name=name, sigma_data=sigma_data):
            """sCD: t = π/2 → arctan(σ/σ_d); MeanFlow: t = 1 → σ/(1 + σ) → 0 (the middle as EDM's σ)."""
            if name == "scd":
                return [math.pi / 2, float(cm_core.continuous.trigflow_time(mid_sigma, sigma_data))]
            return [1.0, float(cm_core.continuous.flow_time(mid_sigma)), 0.0]

        with stage(f"sample and score {label} at 1, 2 NFE"):
            # The middle time as the other models' middle σ: ternary search in ln σ on other seeds.
            search = cm_eval.ternary_search(
                lambda mid, model=model, spec=spec, times=two_step_times: cm_eval.fd_digits(
                    sample(model, times(mid), spec, search_seeds, search_labels).clamp(-1, 1)
                ),
                0.1,
                10.0,
                iters=budget.search_iters,
            )
            two_step[name] = search
            for ts in (spec.default_sigmas(1), two_step_times(search["best"])):
                nfe = spec.nfe(ts)
                what = "1-step" if nfe == 1 else "2-step (t = " + " → ".join(f"{t:.3g}" for t in ts) + ")"
                score(label, what, nfe, sample(model, ts, spec), ts)

    teacher35 = next(r for r in rows if r["model"] == "teacher" and r["nfe"] == 35)
    for r in rows:
        r["fd_vs_teacher35"] = r["fd_digits"] / teacher35["fd_digits"]

    # ---- 4. editing and inversion ---------------------------------------------------------------
    f_ect = models["ect"].function
    test_x, test_y = cm_eval.load_digits_data("test")
    k = 20
    originals, classes = test_x[:k], test_y[:k]
    gen = torch.Generator().manual_seed(0)
    edits = {}
    with stage("zero-shot editing with the ECT model"):
        mask = torch.ones(1, 1, 8, 8)
        mask[..., 4:, :] = 0  # the lower half is unknown
        filled = cm_core.inpaint(f_ect, originals, mask, FOUR_STEP, generator=gen, class_labels=classes).clamp(-1, 1)
        shown = originals * mask + (1 - mask) * -0.2  # unknown pixels shown grey
        hole = (1 - mask).expand_as(originals).bool()
        edits["inpaint"] = {
            "mse_unknown": float((filled - originals)[hole].square().mean()),
            "mse_known": float((filled - originals)[~hole].square().mean()),
            "class_acc": cm_eval.digits_class_accuracy(filled, classes),
            "class_acc_masked_input": cm_eval.digits_class_accuracy(shown, classes),
        }
        _grid_rows(work / "edits" / "inpaint.png", [originals, shown, filled])

        blocky = cm_core.SuperResolution(2).downsample(originals)
        sharp = cm_core.super_resolve(
            f_ect, blocky, FOUR_STEP, patch_size=2, generator=gen, class_labels=classes
        ).clamp(-1, 1)
        edits["superres"] = {
            "mse_input": float((blocky - originals).square().mean()),
            "mse_output": float((sharp - originals).square().mean()),
            "class_acc": cm_eval.digits_class_accuracy(sharp, classes),
        }
        _grid_rows(work / "edits" / "superres.png", [originals, blocky, sharp])

        # Endpoints that look different: per class, the two of 16 noises whose 1-step samples differ
        # most (two random noises of one class often give near-identical digits at 8×8).
        interp_classes = torch.tensor([0, 2, 3, 5, 8])
        pool = torch.stack([cm_eval.PerImageNoise(range(100 + 16 * i, 116 + 16 * i)).randn(shape) for i in range(5)])
        with torch.no_grad():
            looks = f_ect(
                pool.reshape(-1, *shape) * 80.0,
                torch.full((5 * 16,), 80.0),
                class_labels=interp_classes.repeat_interleave(16),
            ).reshape(5, 16, -1)
        far = torch.cdist(looks, looks).flatten(1).argmax(1)  # the most different pair per class
        z = pool[torch.arange(5), far // 16]
        z2 = pool[torch.arange(5), far % 16]
        alphas = [i / 9 for i in range(10)]
        path_imgs = cm_core.interpolate(
            f_ect,
            z,
            z2,
            alphas,
            [80.0, two_step["ect"]["best"]],
            generator=gen,
            class_labels=interp_classes,
        )
        # [α, B, ...] → rows = the 5 pairs, columns = α from 0 to 1.
        cm_eval.save_sample_grid(
            path_imgs.transpose(0, 1).reshape(-1, *shape).clamp(-1, 1),
            work / "edits" / "interpolate.png",
            ncol=len(alphas),
        )

    with stage("BCM inversion and reconstruction"):
        m = min(200, len(test_x))
        variants = []  # (what, invert σ, reconstruct σ); BCM's own recipe goes 0.07 → 15 → 80
        for what, up, down in INVERSIONS:
            shown = what == INVERSIONS[1][0]
            r = cm_eval.inversion_error(
                models["bcm"].function,
                test_x[:m],
                labels=test_y[:m],
                invert_sigmas=up,
                reconstruct_sigmas=down,
                side_by_side=work / "edits" / "bcm-reconstruct.png" if shown else None,
                max_pairs=20,
            )
            r.pop("mse_per_image")
            if "side_by_side" in r:  # relative to the output folder, not the temporary one
                r["side_by_side"] = "edits/bcm-reconstruct.png"
            variants.append(dict(r, what=what))
        fresh = sample(models["bcm"], [80.0, 0.002], "bcm-ancestral", list(range(500_000, 500_000 + m)), test_y[:m])
        edits["bcm_inversion"] = {
            "variants": variants,
            "num_images": m,
            "mse_fresh_noise": float((fresh.clamp(-1, 1) - test_x[:m]).square().mean()),
        }

    # ---- 5. plots and the report --------------------------------------------------------------
    plots = work / "plots"
    series = {name: ([r["nfe"] for r in rs], [r["fd_digits"] for r in rs]) for name, rs in curves.items()}
    real_halves = _real_halves_fd()
    cm_eval.plot_curves(
        series,
        plots / "fd-vs-nfe.png",
        xlabel="NFE (network evaluations per sample)",
        ylabel="FD-digits (lower is better)",
        title="Sample quality vs NFE",
        log_x=True,
        log_y=True,
        hlines={"two halves of the real digits": real_halves},
    )
    ode = {name: ([r["nfe"] for r in rs], [r["ode_mse"] for r in rs]) for name, rs in curves.items()}
    cm_eval.plot_curves(
        ode,
        plots / "ode-error-vs-nfe.png",
        xlabel="NFE",
        ylabel="MSE to the teacher's ODE solution",
        title="ODE solving error (same initial noise)",
        log_x=True,
        log_y=True,
    )
    cm_eval.plot_curves(
        {DISPLAY[n]: _loss_curve(work / "runs" / n) for n in runs},
        plots / "training-loss.png",
        xlabel="step",
        ylabel="loss (objective's own units)",
        title="Training loss",
        log_y=True,
    )
    real = torch.cat([test_x[test_y == c][:10] for c in range(10)]).reshape(10, 10, *shape).transpose(0, 1)
    cm_eval.save_sample_grid(real.reshape(-1, *shape), grids / "real-digits.png", ncol=10)
    by_key = {(r["model"], r["nfe"]): r for r in rows}
    panels = [("real digits (held out)", grids / "real-digits.png")] + [
        (f"{m} · {k} NFE · FD {by_key[(m, k)]['fd_digits']:.1f}", work / by_key[(m, k)]["grid"])
        for m, k in (("teacher", 35), ("teacher", 3), ("ECT", 1), ("ECT", 2), ("ICT", 1), ("BCM", 1))
    ]
    cm_eval.plot_image_panels(panels, plots / "overview.png", ncol=4)

    columns = ["model", "sampler", "NFE", "FD-digits", "FD / teacher-35", "class acc", "ODE MSE"]
    table_rows = [
        [r["model"], r["sampler"], r["nfe"], r["fd_digits"], r["fd_vs_teacher35"], r["class_acc"], r["ode_mse"]]
        for r in rows
    ]
    text = cm_eval.format_table(columns, table_rows)
    ect = {r["nfe"]: r for r in rows if r["model"] == "ECT"}
    scd = {r["nfe"]: r for r in rows if r["model"] == "sCD"}
    verdict = (
        f"ECT at 2 NFE: FD-digits {ect[2]['fd_digits']:.1f} = {ect[2]['fd_vs_teacher35']:.2f}× the teacher's 35-NFE "
        f"{teacher35['fd_digits']:.1f} (aim ≤ 1.3×); at 1 NFE {ect[1]['fd_vs_teacher35']:.2f}× (aim ≤ 2×). "
        f"sCD at 2 NFE: {scd[2]['fd_vs_teacher35']:.2f}× (aim ≤ 1.3×). "
        f"Two halves of the real digits score {real_halves:.1f}: the floor of this metric at this sample size."
    )
    sections = _sections(work, budget, quick, rows, columns, table_rows, edits, two_step, stage.times, verdict)
    return {
        "quick": quick,
        "budget": asdict(budget),
        "table": rows,
        "text": text + "\n\n" + verdict,
        "edits": edits,
        "two_step_search": {k: {"best": v["best"], "best_value": v["best_value"]} for k, v in two_step.items()},
        "real_halves_fd": real_halves,
        "stage_seconds": stage.times,
        "sections": sections,
    }


def _grid_rows(path: Path, rows: list[torch.Tensor]) -> None:
    cm_eval.save_sample_grid(torch.cat(rows).clamp(-1, 1), path, ncol=len(rows[0]))


def _real_halves_fd() -> float:
    """FD-digits between two halves of the real data: what "as good as the data" scores here."""
    x, _ = cm_eval.load_digits_data("all")
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    half = len(x) // 2
    other = cm_eval.compute_stats(cm_eval.load_digits_classifier(), x[perm[half:]], key="features")
    return cm_eval.fd_digits(x[perm[:half]], reference={"mu": other.mean(), "sigma": other.cov()})


def _sections(work, budget, quick, rows, columns, table_rows, edits, two_step, times, verdict) -> list[dict]:
    img = lambda rel, caption, scale=4: {"path": work / rel, "caption": caption, "scale": scale}  # noqa: E731
    grid_imgs = [
        img(r["grid"], f"{r['model']} · {r['sampler']} · {r['nfe']} NFE · FD {r['fd_digits']:.1f}", 3) for r in rows
    ]
    inp, sr, inv = edits["inpaint"], edits["superres"], edits["bcm_inversion"]
    timing = [[name, seconds] for name, seconds in times.items()]
    return [
        {
            "heading": "Results",
            "text": [verdict],
            "table": {"columns": columns, "rows": table_rows},
            "images": [
                img("plots/overview.png", "the same seeds through every model (each row of a grid reads 0 … 9)", 1),
                img("plots/fd-vs-nfe.png", "FD-digits vs NFE (log-log); dashed: real vs real", 1),
                img(
                    "plots/ode-error-vs-nfe.png",
                    f"MSE to the teacher's {2 * budget.reference_steps - 1}-NFE solution from the same noise",
                    1,
                ),
            ],
            "notes": [
                "FD-digits: Fréchet distance between 64-d features of cm-eval's shipped digits classifier (99.3 % "
                f"held-out accuracy) of {budget.eval_samples} samples and of all 1,797 real digits. Class acc: the "
                "classifier's agreement with the requested class. ODE MSE: per-pixel MSE to the teacher's Heun "
                f"solution on a {budget.reference_steps}-point Karras grid from the same initial noise (Direct CM's "
                "ODE solving error). Multistep CM sampling re-noises with fresh ε, so its samples leave the ODE path "
                "of their initial noise and the error grows with NFE by design; BCM's ancestral chain is "
                "deterministic and stays on it. MSE also rewards blur: compare it between models of similar FD. "
                "iCT never saw the teacher, so its ODE error measures a different model, not a failure.",
                "2-NFE middle σ by ternary search in ln σ on other seeds (sCD: t = arctan(σ/σ_d), MeanFlow: "
                "t = σ/(1 + σ)): "
                + ", ".join(f"{DISPLAY[k] if k in ('scd', 'meanflow') else k.upper()} {v['best']:.3g}"
                            for k, v in two_step.items())
                + f"; 4 NFE uses σ = {FOUR_STEP} for every model.",
            ],
        },
        {"heading": "Samples (same seeds in every grid; each row reads 0 1 2 … 9)", "images": grid_imgs},
        {
            "heading": "Zero-shot editing with the ECT model (CM Algorithm 4, 4 steps)",
            "text": [
                f"Inpainting the lower half: MSE on the unknown pixels {inp['mse_unknown']:.3f} (known pixels "
                f"{inp['mse_known']:.1e}); the classifier reads the requested class in {100 * inp['class_acc']:.0f} % "
                f"of the completions vs {100 * inp['class_acc_masked_input']:.0f} % of the masked inputs.",
                f"2× super-resolution (each 2×2 block averaged: 4×4 → 8×8): MSE {sr['mse_input']:.3f} for the blocky input, "
                f"{sr['mse_output']:.3f} after; class accuracy {100 * sr['class_acc']:.0f} %.",
            ],
            "images": [
                img("edits/inpaint.png", "rows: held-out digits · lower half hidden · inpainted"),
                img("edits/superres.png", "rows: held-out digits · 2×2 block means (4×4) · super-resolved"),
                img(
                    "edits/interpolate.png",
                    "slerp between two noises, α = 0 … 1 left to right (classes 0 2 3 5 8; per class the two of "
                    "16 noises whose samples differ most)",
                ),
            ],
        },
        {
            "heading": "BCM: inversion and reconstruction",
            "text": [
                f"{inv['num_images']} held-out digits, each with σ = 0.07 noise, inverted by the BCM network (jumps up "
                "the PF-ODE) and reconstructed (jumps down); MSE per pixel in [-1, 1]. For scale: a fresh sample of "
                f"the same class from new noise is at MSE {inv['mse_fresh_noise']:.3f}. Inverting all the way to "
                "σ = 80 keeps only what the noise can carry; stopping earlier keeps more of the image."
            ],
            "table": {
                "columns": ["recipe", "NFE", "MSE", "PSNR (dB)"],
                "rows": [[v["what"], v["nfe"], v["mse"], v["psnr"]] for v in inv["variants"]],
            },
            "images": [
                img(
                    "edits/bcm-reconstruct.png",
                    f"top: held-out digits; bottom: reconstructed ({inv['variants'][1]['what']})",
                )
            ],
        },
        {
            "heading": "Training",
            "text": [
                f"Network: mlp-digits (residual MLP, hidden {budget.hidden}); batch {budget.batch_size}; steps: "
                f"teacher {budget.teacher_steps}, ECT {budget.ect_steps}, iCT {budget.ict_steps}, "
                f"BCM {budget.bcm_steps}."
                + (" Quick mode: budgets cut for a 1-minute smoke run; expect worse numbers." if quick else "")
            ],
            "table": {"columns": ["stage", "seconds"], "rows": timing},
            "images": [
                img(
                    "plots/training-loss.png",
                    "loss per logged step, each objective in its own units (consistency losses stay flat by design: "
                    "their curricula shrink the σ gap as training goes)",
                    1,
                )
            ],
        },
    ]
