"""Speed and memory of the real-size model: the full SDXL architecture with random weights (profile sdxl-random).

Run on a CUDA machine: ``python benchmarks/bench_sdxl.py [--out results.json] [--quick]``. Prints a table last.
Measures (1024x1024, 30 steps, fp16): a plain text-to-image call, a plain inpainting call at strength 0.65, our
coarse-to-fine with two subjects (Phase 0, each subject pass, total, peak memory), LoRA training seconds/step and peak
memory with and without gradient checkpointing (rank 16, batch 1), and the QA loop's scoring and refinement times with
a full-size open_clip ViT-H-14 image tower.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import ProjectConfig  # noqa: E402
from helpers.layout import default_layout  # noqa: E402
from helpers.models import load_models  # noqa: E402
from helpers import pipeline as hp  # noqa: E402
from helpers.adapters import only_adapter  # noqa: E402


def timed(fn, repeat: int = 1):
    """Median seconds over ``repeat`` calls (after CUDA sync) and the last result."""
    times, result = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def peak_gib(fn):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, result = timed(fn)
    return seconds, torch.cuda.max_memory_allocated() / 2**30, result


def add_random_adapters(models, names, rank=16):
    from peft import LoraConfig

    for name in names:
        models.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)
        with torch.no_grad():  # keep the random LoRA deltas small, like trained ones; same dtype as the base
            for pname, p in models.unet.named_parameters():
                if f".{name}." in pname:
                    p.data = p.data.to(models.dtype) * (0.01 if "lora_B" in pname else 1.0)


def cast_unet_inputs(models):
    """Seen on the GPU machine (torch 2.11): the pipeline handed the fp16 UNet float32 latents once adapters were
    attached. Cast floating inputs to the UNet's dtype so the benchmark measures the fp16 path."""
    def hook(module, args, kwargs):
        args = tuple(a.to(module.dtype) if torch.is_tensor(a) and a.is_floating_point() and a.dtype != module.dtype
                     and a.dim() > 1 else a for a in args)
        return args, kwargs

    models.unet.register_forward_pre_hook(hook, with_kwargs=True)


def bench_generation(models, config, results):
    from PIL import Image

    steps, size = config.steps, config.resolution
    plain = lambda: models.txt2img(prompt="a cat and a mug on a table", height=size, width=size,  # noqa: E731
                                   num_inference_steps=steps, generator=models.generator(0), output_type="latent")
    timed(lambda: models.txt2img(prompt="warm up", height=size, width=size, num_inference_steps=2,
                                 output_type="latent"))
    with only_adapter(models, None):
        results["plain_txt2img_s"], _ = timed(plain, repeat=3)
        image = Image.new("RGB", (size, size), (128, 128, 128))
        mask = Image.new("L", (size, size), 0)
        mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
        inpaint = lambda: models.inpaint(prompt="a mug", image=image, mask_image=mask, strength=0.65,  # noqa: E731
                                         height=size, width=size, num_inference_steps=steps,
                                         generator=models.generator(0), output_type="latent")
        results["plain_inpaint_0.65_s"], _ = timed(inpaint, repeat=3)
    layout = default_layout(config.subject_names, size, size)
    hp.coarse_to_fine(models, config, layout)  # warm-up of the adapter paths
    seconds, peak, result = peak_gib(lambda: hp.coarse_to_fine(models, config, layout))
    results["ours_total_s"] = seconds
    results["ours_phase0_s"] = result.seconds["phase0"]
    for p in result.passes:
        results[f"ours_pass_{p.subject}_s"] = p.seconds
        results[f"ours_pass_{p.subject}_adapters"] = p.active_adapters
    results["ours_peak_gib"] = peak
    results["vae_float32_fallbacks"] = models.decode_stats.float32_fallbacks
    return result


def bench_qa(models, config, result, results):
    from PIL import Image

    from helpers.qa import score_subject
    from helpers.scoring import ClipScorer

    refs = {name: [Image.new("RGB", (256, 256), (40 * i, 90, 160)) for i in range(4)] for name in config.subject_names}
    scorer = ClipScorer.for_config(config, device=models.device, references=refs)
    subject = config.subjects[0]
    score_subject(scorer, result.final, result, subject, 0.5, config.region_margin)  # warm-up + reference cache
    results["qa_score_one_region_s"], _ = timed(
        lambda: score_subject(scorer, result.final, result, subject, 0.5, config.region_margin), repeat=5)
    results["qa_refine_one_subject_s"], _ = timed(
        lambda: hp.region_pass(models, config, result.final, result.masks, subject, 123, config.refine_strength,
                               emphasis_weight=config.prompt_boost), repeat=2)
    torch.cuda.empty_cache()


def bench_training(models, config, results, steps: int):
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
    for checkpointing in (True, False):
        cfg = config.replace(gradient_checkpointing=checkpointing)
        trainer = LoraTrainer(models, cfg, f"bench_{int(checkpointing)}", data)
        try:
            for _ in range(2):
                trainer.step()  # warm-up
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            per_step, _ = timed(trainer.step, repeat=steps)
            key = "with" if checkpointing else "without"
            results[f"train_s_per_step_{key}_checkpointing"] = per_step
            results[f"train_peak_gib_{key}_checkpointing"] = torch.cuda.max_memory_allocated() / 2**30
            results["train_optimizer"] = type(trainer.optimizer).__name__
        finally:
            trainer.close()
    restore_encoders(models)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma list of: generation,qa,training")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    skip = set(filter(None, args.skip.split(",")))
    config = ProjectConfig(profile="sdxl-random", resolution=1024, steps=30, train_resolution=1024, lora_rank=16,
                           train_batch_size=1, learning_rate=1e-5)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()
    models = load_models(config)
    results["build_s"] = time.perf_counter() - t0
    results["unet_params_m"] = sum(p.numel() for p in models.unet.parameters()) / 1e6
    add_random_adapters(models, config.subject_names, rank=config.lora_rank)
    cast_unet_inputs(models)

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))

    result = None
    if "generation" not in skip:
        result = bench_generation(models, config, results)
        save()
    if "qa" not in skip and result is not None:
        bench_qa(models, config, result, results)
        save()
    if "training" not in skip:
        bench_training(models, config, results, args.train_steps)
        save()
    print(f"\n{'metric':<44} value")
    for key, value in results.items():
        print(f"{key:<44} {value:.3f}" if isinstance(value, float) else f"{key:<44} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
