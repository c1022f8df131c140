"""One DreamBooth-style LoRA per subject, after diffusers' ``train_dreambooth_lora_sdxl.py``.

Latents and text embeddings are computed once, so the loop needs only the UNet. Checkpoints (LoRA weights, optimizer
and RNG state, all in one safetensors file) are written atomically every ``checkpoint_every`` steps; an interrupted
run resumes bit-exactly. A LoRA whose training-config hash matches is not trained again.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ProjectConfig, Subject, atomic_path, write_text_atomic
from .data import augment, load_subject_photos, subject_photo_paths
from .models import ModelBundle, load_models, model_source
from .pipeline import LORA_WEIGHTS_FILE, only_adapter, save_image_atomic

META_FILE = "train_meta.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
VIEWS_PER_PHOTO = 4  # augmented crops/flips per photo, encoded once
HASHED_FIELDS = ("profile", "train_steps", "train_resolution", "train_batch_size", "lora_rank", "lora_alpha",
                 "learning_rate", "min_snr_gamma", "prior_preservation", "prior_loss_weight", "num_class_images",
                 "seed")


@dataclass
class TrainReport:
    subject: str
    status: str  # "trained", "skipped", "resumed", "interrupted"
    steps_done: int
    seconds: float
    loss_history: list[float] = field(default_factory=list)
    lora_path: str = ""
    message: str = ""


# ----------------------------------------------------------------------------------------------------------------
# hashing and metadata
# ----------------------------------------------------------------------------------------------------------------
def training_fingerprint(config: ProjectConfig, subject: Subject, model_source: str) -> dict:
    """What decides the LoRA's weights: settings, subject words, base model and the photos' bytes."""
    photos = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
              for p in subject_photo_paths(config.data_path(subject), subject.name)}
    settings = {k: getattr(config, k) for k in HASHED_FIELDS}
    return {"settings": settings, "subject": {"token": subject.token, "class_name": subject.class_name},
            "base_model": model_source, "photos": photos}


def fingerprint_hash(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def library_versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything the loop reads, precomputed: the VAE and text encoders are not needed while it runs."""

    latents: torch.Tensor  # (N, 4, h, w), already scaled by the VAE factor
    prompt_embeds: torch.Tensor  # (1, 77, 2048)
    pooled_embeds: torch.Tensor  # (1, 1280)
    time_ids: torch.Tensor  # (1, 6)
    class_latents: torch.Tensor | None = None
    class_prompt_embeds: torch.Tensor | None = None
    class_pooled_embeds: torch.Tensor | None = None


def encode_images(models: ModelBundle, images: list[Image.Image]) -> torch.Tensor:
    pixels = models.txt2img.image_processor.preprocess(images).to(models.device, models.vae.dtype)
    with torch.no_grad():
        latents = torch.cat([models.vae.encode(pixels[i:i + 4]).latent_dist.mode() for i in range(0, len(pixels), 4)])
    return latents.float() * models.vae.config.scaling_factor


def encode_text(models: ModelBundle, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, _, pooled, _ = models.txt2img.encode_prompt(
            prompt, device=models.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return embeds, pooled


def class_images(models: ModelBundle, config: ProjectConfig, subject: Subject) -> list[Image.Image]:
    """Prior-preservation images of the subject's class, generated once by the base model and cached."""
    folder = config.cache_path / "class_images" / f"{subject.class_name.replace(' ', '_')}_{config.train_resolution}"
    existing = sorted(folder.glob("*.png"))
    images = [Image.open(p).convert("RGB") for p in existing[:config.num_class_images]]
    with only_adapter(models, None):
        for i in range(len(images), config.num_class_images):
            latents = models.txt2img(
                prompt=subject.class_prompt, height=config.train_resolution, width=config.train_resolution,
                num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                generator=models.generator(10_000 + i), output_type="latent").images
            image = models.decode(latents)[0]
            save_image_atomic(image, folder / f"{i:04d}.png")
            images.append(image)
    return images


def prepare_training_data(models: ModelBundle, config: ProjectConfig, subject: Subject) -> TrainingData:
    photos = load_subject_photos(config, subject)
    rng = random.Random(config.seed)
    views = [augment(photo, config.train_resolution, rng) for photo in photos for _ in range(VIEWS_PER_PHOTO)]
    embeds, pooled = encode_text(models, subject.instance_prompt)
    res = config.train_resolution
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=models.device)
    data = TrainingData(encode_images(models, views), embeds, pooled, time_ids)
    if config.prior_preservation and config.num_class_images > 0:
        data.class_latents = encode_images(models, class_images(models, config, subject))
        data.class_prompt_embeds, data.class_pooled_embeds = encode_text(models, subject.class_prompt)
    return data


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
class LoraTrainer:
    """A LoRA adapter on the bundle's UNet, its optimizer and its RNG: step, checkpoint, resume, export."""

    def __init__(self, models: ModelBundle, config: ProjectConfig, adapter_name: str, data: TrainingData):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.models, self.config, self.adapter_name, self.data = models, config, adapter_name, data
        self.unet = models.unet
        self.noise_scheduler = DDPMScheduler.from_config(models.txt2img.scheduler.config)
        self.cuda = models.device.type == "cuda"
        if adapter_name in (getattr(self.unet, "peft_config", None) or {}):
            self.unet.delete_adapters(adapter_name)
        torch.manual_seed(config.seed)  # LoRA init is random: seed it so a resumed run starts from the same point
        self.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                         init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES),
                              adapter_name=adapter_name)
        self.unet.set_adapters([adapter_name])
        self.unet.requires_grad_(False)
        self.params: list[torch.nn.Parameter] = []
        for name, p in self.unet.named_parameters():
            if f".{adapter_name}." in name and "lora_" in name:
                p.requires_grad_(True)
                self.params.append(p)
        cast_training_params(self.unet, dtype=torch.float32)  # trainable weights in fp32, the frozen base in fp16
        if self.cuda and config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer = self._make_optimizer()
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.step_count = 0
        self.loss_history: list[float] = []

    def _make_optimizer(self) -> torch.optim.Optimizer:
        if self.cuda:
            try:
                import bitsandbytes as bnb  # 8-bit Adam: a quarter of the optimizer memory

                return bnb.optim.AdamW8bit(self.params, lr=self.config.learning_rate)
            except ImportError:
                pass
        return torch.optim.AdamW(self.params, lr=self.config.learning_rate, weight_decay=1e-2)

    def _loss(self, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        device, sched = self.models.device, self.noise_scheduler
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],),
                                  generator=self.generator).to(device)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
        n = latents.shape[0]
        with torch.autocast("cuda", dtype=self.models.dtype, enabled=self.cuda and self.models.dtype != torch.float32):
            pred = self.unet(noisy.to(self.unet.dtype), timesteps, embeds.expand(n, -1, -1),
                             added_cond_kwargs={"text_embeds": pooled.expand(n, -1),
                                                "time_ids": self.data.time_ids.expand(n, -1)}).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.min_snr_gamma > 0:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(sched, timesteps)
            weights = torch.clamp(snr, max=self.config.min_snr_gamma) / snr
            if sched.config.prediction_type == "v_prediction":
                weights = torch.clamp(snr, max=self.config.min_snr_gamma) / (snr + 1)
            per_sample = per_sample * weights
        return per_sample.mean()

    def step(self) -> float:
        data, batch = self.data, self.config.train_batch_size
        index = torch.randint(0, data.latents.shape[0], (batch,), generator=self.generator)
        loss = self._loss(data.latents[index.to(data.latents.device)], data.prompt_embeds, data.pooled_embeds)
        if data.class_latents is not None:
            class_index = torch.randint(0, data.class_latents.shape[0], (batch,), generator=self.generator)
            loss = loss + self.config.prior_loss_weight * self._loss(
                data.class_latents[class_index.to(data.class_latents.device)], data.class_prompt_embeds,
                data.class_pooled_embeds)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.step_count += 1
        value = float(loss.detach())
        if not torch.isfinite(torch.tensor(value)):
            raise FloatingPointError(f"training loss became {value} at step {self.step_count}: lower the learning "
                                     f"rate ({self.config.learning_rate:g}) or keep mixed precision off")
        self.loss_history.append(value)
        return value

    # -- export -------------------------------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' format (what ``load_lora_weights`` reads)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.unet, adapter_name=self.adapter_name)
        return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}

    def save_lora(self, folder: Path) -> Path:
        """``save_lora_weights`` into a temp folder, then an atomic rename over the final file."""
        from diffusers import StableDiffusionXLPipeline

        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=self.lora_state_dict(),
                                                        safe_serialization=True)
            os.replace(Path(tmp) / LORA_WEIGHTS_FILE, folder / LORA_WEIGHTS_FILE)
        return folder / LORA_WEIGHTS_FILE

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Path, config_hash: str) -> None:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        opt = self.optimizer.state_dict()
        for pid, state in opt["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
        tensors["rng"] = self.generator.get_state()
        scalars = {pid: {k: v for k, v in st.items() if not torch.is_tensor(v)} for pid, st in opt["state"].items()}
        metadata = {"step": str(self.step_count), "config_hash": config_hash,
                    "loss_history": json.dumps(self.loss_history), "param_groups": json.dumps(opt["param_groups"]),
                    "opt_scalars": json.dumps(scalars)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_checkpoint(self, path: Path, config_hash: str) -> bool:
        """Restore weights, optimizer and RNG; False (and a warning) for a foreign or unreadable checkpoint."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            warnings.warn(f"{path}: unreadable checkpoint ({e}); starting this subject from step 0")
            return False
        if metadata.get("config_hash") != config_hash:
            warnings.warn(f"{path}: checkpoint is from another training config; starting from step 0")
            return False
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"].to(p.device, p.dtype))
        scalars = json.loads(metadata["opt_scalars"])
        state = {}
        for pid, st in scalars.items():
            state[int(pid)] = dict(st)
            for key in [k.split(".", 2)[2] for k in tensors if k.startswith(f"opt.{pid}.")]:
                state[int(pid)][key] = tensors[f"opt.{pid}.{key}"]
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        self.generator.set_state(tensors["rng"])
        self.step_count = int(metadata["step"])
        self.loss_history = json.loads(metadata["loss_history"])
        return True

    def close(self) -> None:
        """Take the training adapter off the shared UNet and restore inference settings."""
        if self.cuda and self.config.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        self.unet.eval()
        self.unet.delete_adapters(self.adapter_name)
        if not getattr(self.unet, "peft_config", None):  # leave no empty peft state for the next add_adapter to warn on
            self.unet.__dict__.pop("peft_config", None)
            self.unet._hf_peft_config_loaded = False
        self.unet.requires_grad_(False)


def offload_encoders(models: ModelBundle) -> None:
    """On CUDA, park the VAE and both text encoders on the CPU while the loop runs: it only needs the UNet."""
    if models.device.type == "cuda":
        for module in (models.vae, models.txt2img.text_encoder, models.txt2img.text_encoder_2):
            module.to("cpu")
        torch.cuda.empty_cache()


def restore_encoders(models: ModelBundle) -> None:
    if models.device.type == "cuda":
        for module in (models.vae, models.txt2img.text_encoder, models.txt2img.text_encoder_2):
            module.to(models.device)


# ----------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------
def skip_report(config: ProjectConfig, subject: Subject, config_hash: str) -> TrainReport | None:
    """A "skipped" report when the subject's LoRA exists and was trained with this exact config, else None."""
    folder = config.lora_path(subject)
    meta = read_meta(folder)
    if not (folder / LORA_WEIGHTS_FILE).exists() or not meta or meta.get("config_hash") != config_hash:
        return None
    return TrainReport(subject.name, "skipped", meta["steps_done"], 0.0, meta.get("loss_history", []),
                       str(folder / LORA_WEIGHTS_FILE), f"{subject.name}: LoRA up to date (hash {config_hash}), skipped")


def train_subject(models: ModelBundle, config: ProjectConfig, subject: Subject, force: bool = False,
                  stop_after_steps: int | None = None, progress: bool = True,
                  fingerprint: dict | None = None) -> TrainReport:
    """Train (or skip, or resume) one subject's LoRA; see the module docstring for the rules."""
    from tqdm.auto import tqdm

    folder = config.lora_path(subject)
    fingerprint = fingerprint or training_fingerprint(config, subject, model_source(config.profile))
    config_hash = fingerprint_hash(fingerprint)
    if not force and (skipped := skip_report(config, subject, config_hash)):
        return skipped
    meta = read_meta(folder)
    lora_file = folder / LORA_WEIGHTS_FILE
    message = ""
    if lora_file.exists() and meta and not force:
        what = ", ".join(changed_keys(meta.get("fingerprint", {}), fingerprint)) or "unknown"
        message = f"{subject.name}: training config changed ({what}): retraining"
    start = time.perf_counter()
    data = prepare_training_data(models, config, subject)
    offload_encoders(models)
    trainer = LoraTrainer(models, config, f"{subject.name}__training", data)
    checkpoint = folder / CHECKPOINT_FILE
    resumed = False
    try:
        if checkpoint.exists() and not force:
            resumed = trainer.load_checkpoint(checkpoint, config_hash)
        steps_this_call = config.train_steps - trainer.step_count
        if stop_after_steps is not None:
            steps_this_call = min(steps_this_call, stop_after_steps)
        folder.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=config.train_steps, initial=trainer.step_count, desc=f"train {subject.name}",
                   disable=not progress, leave=False)
        for _ in range(steps_this_call):
            loss = trainer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if trainer.step_count % config.checkpoint_every == 0 and trainer.step_count < config.train_steps:
                trainer.save_checkpoint(checkpoint, config_hash)
        bar.close()
        seconds = time.perf_counter() - start
        if trainer.step_count < config.train_steps:  # time-boxed call: leave a checkpoint to resume from
            trainer.save_checkpoint(checkpoint, config_hash)
            return TrainReport(subject.name, "interrupted", trainer.step_count, seconds, trainer.loss_history, "",
                               f"{subject.name}: stopped at step {trainer.step_count}/{config.train_steps}; "
                               f"run again to resume")
        trainer.save_lora(folder)
        write_text_atomic(folder / META_FILE, json.dumps({
            "subject": subject.name, "config_hash": config_hash, "fingerprint": fingerprint,
            "steps_done": trainer.step_count, "loss_history": trainer.loss_history, "seconds": round(seconds, 3),
            "resumed": resumed, "versions": library_versions(), "device": models.device.type,
        }, indent=2))
        checkpoint.unlink(missing_ok=True)
    finally:
        trainer.close()
        restore_encoders(models)
    status = "resumed" if resumed else "trained"
    return TrainReport(subject.name, status, trainer.step_count, seconds, trainer.loss_history, str(lora_file),
                       message or f"{subject.name}: {status}, {trainer.step_count} steps in {seconds:.1f} s")


def run_training(config: ProjectConfig, force: bool = False, models: ModelBundle | None = None,
                 stop_after_steps: int | None = None, progress: bool = True) -> dict[str, TrainReport]:
    """Train one LoRA per subject of ``config``; up-to-date ones are skipped unless ``force``.

    A changed training config (settings, subject words, base model or photos) retrains that subject automatically:
    the old LoRA stays in place until the new one is written, and the message names what changed.
    """
    reports = {}
    for subject in config.subjects:
        fingerprint = training_fingerprint(config, subject, model_source(config.profile))
        report = None if force else skip_report(config, subject, fingerprint_hash(fingerprint))
        if report is None:  # the model is loaded only when something needs training
            models = models or load_models(config)
            report = train_subject(models, config, subject, force, stop_after_steps, progress, fingerprint)
        reports[subject.name] = report
        print(report.message)
    return reports
