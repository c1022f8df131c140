"""Speed and memory of the real-size model: the full SDXL architecture with random weights (profile sdxl-random).

Run on a CUDA machine: ``python benchmarks/bench_sdxl.py [--out results.json] [--skip training]``. Before timing
anything it asserts that every component is fp16 and records the dtype of the UNet's inputs at every call; the
baseline is a plain diffusers ``StableDiffusionXLPipeline`` (and ``...InpaintPipeline``) built from the same
components without any project code, timed in the same run, and every project path is printed as a ratio to it.
1024x1024, 30 steps, rank-16 random subject LoRAs (deltas scaled like trained ones). Prints a table last.
"""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import PROFILE_DEFAULTS, ProjectConfig  # noqa: E402
from helpers.layout import default_layout  # noqa: E402
from helpers.models import load_models  # noqa: E402
from helpers import pipeline as hp  # noqa: E402

PROMPT = "a cat and a mug on a wooden table, soft window light"


def timed(fn, repeat: int = 1):
    """Median seconds over ``repeat`` calls (after CUDA sync), the last result and the peak memory (GiB)."""
    times, result = [], None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result, torch.cuda.max_memory_allocated() / 2**30


def add_random_adapters(models, names, rank=16):
    from peft import LoraConfig

    for name in names:
        models.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
        with torch.no_grad():  # keep the random LoRA deltas small, like trained ones; same dtype as the base
            for pname, p in models.unet.named_parameters():
                if f".{name}." in pname:
                    p.data = p.data.to(models.dtype) * (0.01 if "lora_B" in pname else 1.0)


def component_dtypes(models) -> dict:
    return {name: sorted({str(p.dtype) for p in getattr(models.txt2img, name).parameters()})
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def assert_fp16(models) -> None:
    """Every parameter of every component in fp16 (a silently fp32 twin made earlier figures wrong)."""
    for name, dtypes in component_dtypes(models).items():
        assert dtypes == ["torch.float16"], f"{name} has parameters in {dtypes}"


def record_unet_input_dtypes(models, seen: set) -> None:
    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        hidden = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        seen.add((str(sample.dtype), str(hidden.dtype)))

    models.unet.register_forward_pre_hook(hook, with_kwargs=True)


def plain_pipelines(models):
    """diffusers' own pipelines over the same components: the baseline, no project code in the call path."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    parts = {k: getattr(models.txt2img, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                      "tokenizer_2", "unet", "scheduler")}
    t2i = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    inpaint = StableDiffusionXLInpaintPipeline(**parts, add_watermarker=False)
    for pipe in (t2i, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return t2i, inpaint


def plain_inpaint_call(inpaint, config, side: int, images: int = 1):
    """A plain diffusers inpaint of the middle of a grey ``side``² picture, ``images`` per call, ready to time."""
    from PIL import Image

    image = Image.new("RGB", (side, side), (128, 128, 128))
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    # the passes' own schedule, so a pass and its plain twin do one work
    return lambda: inpaint("a mug", image=image, mask_image=mask, strength=config.inpaint_strength, height=side,
                           width=side, num_inference_steps=config.effective_inpaint_steps, num_images_per_prompt=images,
                           generator=torch.Generator().manual_seed(0), output_type="pil")


def bench_generation(models, config, rows: dict, info: dict) -> None:
    from helpers import adapters as ha

    size = config.resolution
    _, inpaint = plain_pipelines(models)
    layout = default_layout(config.subject_names[:2], size, size)
    two = config.replace(subjects=config.subjects[:2])
    models.txt2img.enable_lora()
    result = hp.coarse_to_fine(models, two, layout)  # warm-up of every path
    masks, subject = result.masks, two.subjects[0]
    box = masks.crop_box(subject.name, two.region_margin)
    pass_side = hp.pass_size(models, two, box[2] - box[0])
    info["pass_size"] = {"crop_side": box[2] - box[0], "pass_side": pass_side}

    plain_inpaint = lambda side: plain_inpaint_call(inpaint, config, side)  # noqa: E731

    models.txt2img.disable_lora()
    rows[f"plain inpaint {size}² (strength {config.inpaint_strength})"] = timed(plain_inpaint(size), 3)[::2]
    if pass_side != size:
        rows[f"plain inpaint {pass_side}² (same size as a pass)"] = timed(plain_inpaint(pass_side), 3)[::2]
    models.txt2img.enable_lora()
    one_pass = lambda cfg: hp.region_pass(models, cfg, result.coarse, masks, subject, 7, cfg.inpaint_strength)  # noqa
    rows["one subject pass (fused, batched merge)"] = timed(lambda: one_pass(two), 3)[::2]
    @contextmanager
    def diffusers_fused(models_, name):  # the previous implementation (fuse_lora, unfuse_lora, restore), to compare
        with ha.only_adapter(models_, name), ha._diffusers_fused(models_, name):
            yield

    real_fused, hp.fused_adapter = hp.fused_adapter, diffusers_fused
    try:
        rows["one subject pass (fuse_lora + restore)"] = timed(lambda: one_pass(two), 3)[::2]
    finally:
        hp.fused_adapter = real_fused
    rows["one subject pass (unfused)"] = timed(lambda: one_pass(two.replace(fuse_subject_lora=False)), 3)[::2]
    full = two.replace(subject_pass_min_size=size)
    rows[f"one subject pass (fused, at {size}²)"] = timed(lambda: one_pass(full), 3)[::2]
    rows["coarse-to-fine, 2 subjects"] = timed(lambda: hp.coarse_to_fine(models, two, layout), 3)[::2]
    rows[f"coarse-to-fine, 2 subjects (passes at {size}²)"] = timed(lambda: hp.coarse_to_fine(models, full, layout),
                                                                    2)[::2]
    four = config.replace(subjects=config.subjects[:4])
    layout4 = default_layout(four.subject_names, size, size)
    rows["coarse-to-fine, 4 subjects"] = timed(lambda: hp.coarse_to_fine(models, four, layout4), 2)[::2]
    rows["one QA refinement"] = timed(lambda: hp.region_pass(models, two, result.final, masks, subject, 123,
                                                             two.refine_strength,
                                                             emphasis_weight=two.prompt_boost), 2)[::2]
    info["profile_of_one_pass"] = profile_pass(lambda: one_pass(two), plain_inpaint(pass_side))


def bench_ghosts_and_qa(models, config, rows: dict, info: dict) -> None:
    """The issue-19 paths at full size: Phase 0's ghost cleanup (a scripted finder names one ghost, so exactly one
    full-size cleanup inpaint runs) and the QA loop with its class rule (open_clip ViT-H-14, random weights: every
    rule is evaluated on 1024² own-pixel crops; what it decides means nothing), then its worst case: thresholds no
    score reaches, so both subjects fail every round and every candidate is painted and scored."""
    from helpers import qa as hq
    from helpers.scoring import ClipScorer

    size = config.resolution
    layout = default_layout(config.subject_names[:2], size, size)
    two = config.replace(subjects=config.subjects[:2])
    models.txt2img.enable_lora()

    def one_ghost():
        calls = []

        def finder(image, masks_):
            calls.append(1)
            return [(400, 60, 620, 300)] if len(calls) == 1 else []
        return finder

    cleaned = hp.coarse_to_fine(models, two, layout, find_ghosts=one_ghost())
    info["ghost_cleanup"] = {"boxes_removed": cleaned.ghosts_removed, "scene_size": list(cleaned.scene.size)}
    rows["coarse-to-fine, 2 subjects, one ghost painted over"] = timed(
        lambda: hp.coarse_to_fine(models, two, layout, find_ghosts=one_ghost()), 2)[::2]
    scorer = ClipScorer.for_config(two, device=models.device)
    result = hp.coarse_to_fine(models, two, layout)
    thresholds = hq.subject_thresholds(scorer, two)
    outcome = hq.qa_loop(models, result, two, scorer, thresholds)  # warm-up; also what the loop decided
    info["qa_rules_fired"] = [e["rule"] for e in outcome.log]
    info["qa_loop_invariants"] = hq.loop_invariants(outcome, two)
    rows["QA loop, 2 subjects (class, identity, leak rules; refinements as decided)"] = timed(
        lambda: hq.qa_loop(models, result, two, scorer, thresholds), 2)[::2]
    info["qa_refinements_per_loop"] = sum(s["refinements"] for s in outcome.summary.values())
    unreachable = {name: 2.0 for name in two.subject_names}  # identity is a cosine: at most 1
    worst = hq.qa_loop(models, result, two, scorer, unreachable)  # its batch shapes warmed up
    info["qa_worst_case_refinements"] = sum(s["refinements"] for s in worst.summary.values())
    rows[f"QA loop worst case, 2 subjects x {two.max_retries} rounds x {two.qa_candidates} candidates"] = timed(
        lambda: hq.qa_loop(models, result, two, scorer, unreachable), 1)[::2]


def bench_batched(models, config, rows: dict, seeds: list[int] | None = None, repeat: int = 3,
                  prefix: str = "") -> None:
    """Coarse-to-fine with every subject pass of one strength in one batched call (``batch_subject_passes="all"``:
    the default layouts' crops overlap, so "disjoint" runs them one after another) against sequential passes; with
    ``seeds``, that many composites at once (``pipeline.coarse_to_fine_many``)."""
    size, seeds = config.resolution, seeds or [config.seed]
    for n in (2, 4):
        cfg = config.replace(subjects=config.subjects[:n])
        layout = default_layout(cfg.subject_names, size, size)
        for mode in ("off", "all"):
            c = cfg.replace(batch_subject_passes=mode)
            hp.coarse_to_fine_many(models, c, layout, seeds)  # warm-up of this batch shape
            label = "batched passes" if mode == "all" else "sequential passes"
            rows[f"{prefix}coarse-to-fine, {n} subjects, {label}"] = timed(
                lambda: hp.coarse_to_fine_many(models, c, layout, seeds), repeat)[::2]


def bench_batch4(models, config, rows: dict, t2i, inpaint, other_inpaint_steps: tuple[int, ...] = ()) -> None:
    """The regime of a card that is busy with one image (an L4, an A100): four pictures per call. The plain
    pipelines draw ``num_images_per_prompt=4``; ours makes four composites of one layout
    (``pipeline.coarse_to_fine_many``: Phase 0 in one call, every batch of subject passes once for all four).
    ``other_inpaint_steps``: the 2-subject batched row again with those schedules, to compare in the same run."""
    size = config.resolution
    models.txt2img.disable_lora()
    plain = lambda: t2i(PROMPT, height=size, width=size, num_inference_steps=config.steps,  # noqa: E731
                        num_images_per_prompt=4, generator=torch.Generator().manual_seed(0), output_type="pil")
    plain()  # warm-up of the batch shape
    rows["batch 4: plain t2i"] = timed(plain, 2)[::2]
    rows[f"batch 4: plain inpaint {size}²"] = timed(plain_inpaint_call(inpaint, config, size, images=4), 2)[::2]
    models.txt2img.enable_lora()
    bench_batched(models, config, rows, seeds=[0, 1, 2, 3], repeat=2, prefix="batch 4: ")
    two = config.replace(subjects=config.subjects[:2], batch_subject_passes="all")
    layout = default_layout(two.subject_names, size, size)
    for steps in other_inpaint_steps:
        c = two.replace(inpaint_steps=steps)
        rows[f"batch 4: coarse-to-fine, 2 subjects, batched passes, inpaint_steps {steps}"] = timed(
            lambda: hp.coarse_to_fine_many(models, c, layout, [0, 1, 2, 3]), 2)[::2]


def profile_batch4(models, config, info: dict, t2i) -> None:
    """torch.profiler over one batch-4 coarse-to-fine with 2 subjects (passes batched) and one batch-4 plain t2i:
    where the time beyond the plain picture goes (the labelled stages, the GPU kernels and CPU ops that cost most)."""
    size, two = config.resolution, config.replace(subjects=config.subjects[:2], batch_subject_passes="all")
    layout = default_layout(two.subject_names, size, size)
    runs = {"coarse-to-fine": lambda: hp.coarse_to_fine_many(models, two, layout, [0, 1, 2, 3]),
            "plain t2i": lambda: t2i(PROMPT, height=size, width=size, num_inference_steps=config.steps,
                                     num_images_per_prompt=4, generator=torch.Generator().manual_seed(0),
                                     output_type="pil")}
    out = {}
    for name, fn in runs.items():
        models.txt2img.disable_lora() if name == "plain t2i" else models.txt2img.enable_lora()
        fn()  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        summary, events = profiled(fn, ("pass/", "phase0/"))
        gpu = lambda e: getattr(e, "self_device_time_total", 0) / 1e3  # noqa: E731
        out[name] = {"wall_s_profiled": round(time.perf_counter() - start, 3), **summary,
                     "top_gpu_kernels_ms": {e.key[:90]: round(gpu(e), 1)
                                            for e in sorted(events, key=lambda e: -gpu(e))[:15]}}
    models.txt2img.enable_lora()
    info["profile_batch4"] = out


def profiled(fn, stage_prefixes: tuple[str, ...]) -> tuple[dict, list]:
    """One call of ``fn`` under torch.profiler: its labelled stages (CPU and GPU milliseconds), the ops with the most
    CPU time of their own and the GPU kernels' total; and the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return {
        "stages_ms": {e.key: {"cpu": round(e.cpu_time_total / 1e3, 1),
                              "gpu": round((getattr(e, "device_time_total", None)
                                            or getattr(e, "cuda_time_total", 0)) / 1e3, 1)}
                      for e in events if e.key.startswith(stage_prefixes)},
        "top_self_cpu_ms": {e.key: round(e.self_cpu_time_total / 1e3, 1) for e in
                            sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]},
        "total_gpu_kernel_ms": round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3, 1),
    }, events


def profile_pass(run_pass, run_plain) -> dict:
    """torch.profiler over one fused subject pass and one plain inpaint of the same size: the pass's labelled stages
    (CPU and GPU milliseconds) and the ops with the most CPU time of their own."""
    out = {}
    for name, fn in (("subject pass", run_pass), ("plain inpaint", run_plain)):
        torch.cuda.synchronize()
        out[name] = profiled(fn, ("pass/",))[0]
    return out


def bench_compile(models, config, rows: dict, info: dict, mode: str) -> None:
    """Compile the UNet in place and time Phase 0 + batched passes; ratios stay to the uncompiled plain t2i of this
    run. Warm-up: one run with cat and mug (Phase 0 and the passes' batch shape compile once each); the timed runs
    then use other subjects (toy and dog) too, and dynamo's own counters say whether anything compiled again."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    size = config.resolution
    two = config.replace(subjects=config.subjects[:2], compile_unet=True)
    other_two = config.replace(subjects=config.subjects[2:4], compile_unet=True)
    layouts = {id(c): default_layout(c.subject_names, size, size) for c in (two, other_two)}
    run = lambda c: hp.coarse_to_fine(models, c, layouts[id(c)])  # noqa: E731
    models.unet.to(memory_format=torch.channels_last)
    models.unet.compile(mode=mode, dynamic=False)  # a static graph per pass size (a dynamic one ran slower: run p)
    start = time.perf_counter()
    run(two)  # warm-up: compiles
    torch.cuda.synchronize()
    info[f"compile[{mode}]_warmup_s"] = round(time.perf_counter() - start, 1)
    frames = torch._dynamo.utils.counters["frames"]
    graphs_after_warmup = frames.get("ok", 0)
    recompiles_before = sum(torch._dynamo.utils.counters["recompiles"].values())
    rows[f"compiled ({mode}): coarse-to-fine, 2 subjects (toy, dog), batched passes"] = timed(
        lambda: run(other_two), 3)[::2]
    rows[f"compiled ({mode}): coarse-to-fine, 2 subjects (cat, mug), batched passes"] = timed(lambda: run(two), 3)[::2]
    info[f"compile[{mode}]_frames_compiled_in_warmup"] = graphs_after_warmup
    info[f"compile[{mode}]_frames_compiled_after_warmup"] = frames.get("ok", 0) - graphs_after_warmup
    info[f"compile[{mode}]_recompiles_after_warmup"] = (sum(torch._dynamo.utils.counters["recompiles"].values())
                                                       - recompiles_before)


def bench_compile_four(models, config, rows: dict, info: dict, mode: str) -> None:
    """After ``bench_compile``: 4 subjects (a new batch shape: its first run compiles, timed apart)."""
    four = config.replace(subjects=config.subjects[:4], compile_unet=True)
    layout = default_layout(four.subject_names, config.resolution, config.resolution)
    start = time.perf_counter()
    hp.coarse_to_fine(models, four, layout)
    torch.cuda.synchronize()
    info[f"compile[{mode}]_four_subjects_first_run_s"] = round(time.perf_counter() - start, 1)
    rows[f"compiled ({mode}): coarse-to-fine, 4 subjects, batched passes"] = timed(
        lambda: hp.coarse_to_fine(models, four, layout), 2)[::2]


def bench_training(models, config, rows: dict, steps: int) -> str:
    from helpers.training import LoraTrainer, TrainingData, offload_encoders, restore_encoders

    res = config.train_resolution
    g = torch.Generator("cpu").manual_seed(0)
    data = TrainingData(
        latents=torch.randn(8, 4, res // 8, res // 8, generator=g).to(models.device),
        prompt_embeds=torch.randn(1, 77, models.unet.config.cross_attention_dim, generator=g).to(
            models.device, models.dtype),
        pooled_embeds=torch.randn(1, models.txt2img.text_encoder_2.config.projection_dim, generator=g).to(
            models.device, models.dtype),
        time_ids=torch.tensor([[res, res, 0, 0, res, res]], dtype=models.dtype, device=models.device))
    offload_encoders(models)
    auto_reason = ""
    for setting in ("on", "off", "auto"):
        trainer = LoraTrainer(models, config.replace(gradient_checkpointing=setting), f"bench_{setting}", data)
        try:
            if setting == "auto":
                auto_reason = trainer.checkpointing_reason
                continue
            for _ in range(2):
                trainer.step()  # warm-up
            rows[f"LoRA training step, checkpointing {setting}"] = timed(trainer.step, steps)[::2]
        finally:
            trainer.close()
    restore_encoders(models)
    return auto_reason


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--compile-modes", default="default", help="torch.compile modes to time, comma separated")
    parser.add_argument("--batch4-inpaint-steps", default="",
                        help="comma list of other inpaint_steps to time the batch-4 2-subject batched row at")
    parser.add_argument("--skip", default="",
                        help="comma list of: generation,qa,batched,batch4,profile4,training,compile,compile4")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    skip = set(filter(None, args.skip.split(",")))
    from helpers.config import Subject

    subjects = [Subject(n, t, c, f"data/{n}", f"loras/{n}") for n, t, c in
                (("cat", "sks", "cat"), ("mug", "zwx", "mug"), ("toy", "qwe", "toy"), ("dog", "vbn", "dog"))]
    defaults = {**PROFILE_DEFAULTS["sdxl-random"], "subjects": subjects, "learning_rate": 1e-5,
                "scene_prompt": "{subjects} on a wooden table, soft window light"}  # names every subject
    config = ProjectConfig(profile="sdxl-random", **defaults)
    assert (config.resolution, config.steps, config.train_resolution, config.lora_rank, config.train_batch_size) == \
        (1024, 30, 1024, 16, 1), "the bench measures SDXL's own settings"
    gpu = torch.cuda.get_device_name(0)
    start = time.perf_counter()
    models = load_models(config)
    info = {"gpu": gpu, "torch": torch.__version__, "build_s": round(time.perf_counter() - start, 1),
            "unet_params_m": round(sum(p.numel() for p in models.unet.parameters()) / 1e6, 1),
            "component_dtypes_as_built": component_dtypes(models)}
    if info["component_dtypes_as_built"] != {k: ["torch.float16"] for k in info["component_dtypes_as_built"]}:
        print(f"the twin was not fp16 as built: {info['component_dtypes_as_built']}; cast before timing")
        models.txt2img.to(torch.float16)
    assert_fp16(models)
    add_random_adapters(models, config.subject_names, rank=config.lora_rank)
    assert_fp16(models)
    seen_inputs: set = set()
    record_unet_input_dtypes(models, seen_inputs)
    rows: dict = {}
    t2i, _ = plain_pipelines(models)  # the baseline of every ratio, timed in every run
    models.txt2img.disable_lora()
    size = config.resolution
    t2i(PROMPT, height=size, width=size, num_inference_steps=2, output_type="latent")  # warm-up
    rows["plain t2i"] = timed(lambda: t2i(PROMPT, height=size, width=size, num_inference_steps=config.steps,
                                          generator=torch.Generator().manual_seed(0), output_type="pil"), 3)[::2]
    models.txt2img.enable_lora()
    sections = []
    if "generation" not in skip:
        sections.append(lambda: bench_generation(models, config, rows, info))
    if "qa" not in skip:
        sections.append(lambda: bench_ghosts_and_qa(models, config, rows, info))
    if "batched" not in skip:
        sections.append(lambda: bench_batched(models, config, rows))
    if "batch4" not in skip:
        sections.append(lambda: bench_batch4(models, config, rows, t2i, plain_pipelines(models)[1],
                                                     tuple(int(v) for v in args.batch4_inpaint_steps.split(",") if v)))
    if "profile4" not in skip:
        sections.append(lambda: profile_batch4(models, config, info, t2i))
    if "training" not in skip:
        sections.append(lambda: info.__setitem__("checkpointing_auto_choice",
                                                 bench_training(models, config, rows, args.train_steps)))
    for mode in args.compile_modes.split(","):
        if "compile" not in skip and mode:
            sections.append(lambda mode=mode: bench_compile(models, config, rows, info, mode))
            if "compile4" not in skip:  # its first run compiles a new batch shape (~280 s on an H200)
                sections.append(lambda mode=mode: bench_compile_four(models, config, rows, info, mode))
    for section in sections:
        section()
        write_results(args.out, info, seen_inputs, rows, config)  # after every section: a cut-off run keeps its rows
    assert seen_inputs == {("torch.float16", "torch.float16")}, f"UNet inputs seen: {seen_inputs}"
    table = write_results(args.out, info, seen_inputs, rows, config)
    print(json.dumps(info, indent=1))
    print(f"\n{gpu}, full-size SDXL twin, fp16, 1024², 30 steps")
    print(f"{'row':<66} {'seconds':>8} {'ratio':>7}  {'to':<20} {'peak GiB':>8}")
    for r in table:
        print(f"{r['row']:<66} {r['seconds']:>8.3f} {r['ratio']:>6.2f}x  {r['ratio_to']:<20} {r['peak_gib']:>8.2f}")
    return 0


def write_results(out: Path, info: dict, seen_inputs: set, rows: dict, config) -> list[dict]:
    """The rows so far as ratios, written (with ``info``) to ``out``; returns the table."""
    info["unet_input_dtypes"] = sorted(seen_inputs)
    base = rows.get("plain t2i", (float("nan"),))[0]
    same_size = next((v[0] for k, v in rows.items() if "same size as a pass" in k),
                     next((v[0] for k, v in rows.items() if k.startswith("plain inpaint")), float("nan")))
    full_inpaint = next((v[0] for k, v in rows.items() if k.startswith("plain inpaint")), float("nan"))
    table = []
    for name, (seconds, peak) in rows.items():
        if name.startswith(("one subject pass", "one QA")):
            at_full = f"at {config.resolution}²" in name
            reference, to = (full_inpaint, "plain inpaint (full)") if at_full else (same_size, "plain inpaint (same)")
        elif name.startswith("batch 4:"):
            reference, to = rows["batch 4: plain t2i"][0], "plain t2i, batch 4"
        else:
            reference, to = base, "plain t2i"
        table.append({"row": name, "seconds": round(seconds, 3), "peak_gib": round(peak, 2),
                      "ratio": round(seconds / reference, 2), "ratio_to": to})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "rows": table}, indent=2))
    return table


if __name__ == "__main__":
    sys.exit(main())
