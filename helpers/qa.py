"""The active QA loop: score every subject, refine only the ones that fail, keep the best attempt, log every decision.

Scores: identity = mean cosine similarity (open_clip image embeddings, "CLIP-I") between a subject's region crop and
that subject's reference photos; prompt adherence = CLIP-T between the crop and "a photo of a {class}"; a leakage row
= the crop's identity score against every subject's references. Refinement reuses ``pipeline.region_pass``. No plots.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from .config import ProjectConfig, Subject, write_text_atomic
from .data import load_subject_photos
from .models import ModelBundle, ModelUnavailableError, check_hub_weights, default_device
from .pipeline import GenerationResult, crop_box_for, region_pass, subject_seed

TINY_CLIP_NAME = "helpers-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SDXL_CLIP = ("ViT-H-14", "laion2b_s32b_b79k")
DINO_ID = "facebook/dinov2-base"


# ----------------------------------------------------------------------------------------------------------------
# scorers
# ----------------------------------------------------------------------------------------------------------------
class Scorer(Protocol):
    """What the QA loop needs from a scorer; tests pass one whose answers they control."""

    subject_names: list[str]

    def leakage_row(self, image: Image.Image) -> dict[str, float]: ...

    def prompt_score(self, image: Image.Image, text: str) -> float: ...

    def reference_similarity(self, subject: str) -> float: ...


class ClipScorer:
    """open_clip image/text embeddings; reference embeddings are computed once per subject and cached."""

    def __init__(self, model, preprocess, tokenizer, references: dict[str, list[Image.Image]],
                 device: torch.device, name: str):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device, self.name = device, name
        self.references = references
        self.subject_names = list(references)
        self._reference_embeddings: dict[str, torch.Tensor] = {}
        self._text_embeddings: dict[str, torch.Tensor] = {}  # the QA loop asks for the same class prompts again

    @classmethod
    def for_config(cls, config: ProjectConfig, device: torch.device | str | None = None,
                   references: dict[str, list[Image.Image]] | None = None) -> ClipScorer:
        device = torch.device(device) if device else default_device()
        model, preprocess, tokenizer, name = load_clip(config, device)
        if references is None:
            references = {s.name: load_subject_photos(config, s, min_size=64) for s in config.subjects}
        return cls(model, preprocess, tokenizer, references, device, name)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        visual = self.model.visual
        dtype = getattr(getattr(visual, "conv1", None), "weight", next(visual.parameters())).dtype
        features = self.model.encode_image(batch.to(dtype)).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def reference_embeddings(self, subject: str) -> torch.Tensor:
        if subject not in self._reference_embeddings:
            self._reference_embeddings[subject] = self.embed_images(self.references[subject])
        return self._reference_embeddings[subject]

    def leakage_row(self, image: Image.Image) -> dict[str, float]:
        crop = self.embed_images([image])
        return {s: float((crop @ self.reference_embeddings(s).T).mean()) for s in self.subject_names}

    def identity(self, image: Image.Image, subject: str) -> float:
        return float((self.embed_images([image]) @ self.reference_embeddings(subject).T).mean())

    def prompt_score(self, image: Image.Image, text: str) -> float:
        if text not in self._text_embeddings:
            self._text_embeddings[text] = self.embed_texts([text])
        return float((self.embed_images([image]) @ self._text_embeddings[text].T).item())

    def reference_similarity(self, subject: str) -> float:
        """Mean pairwise similarity of a subject's own photos (nan with a single photo)."""
        refs = self.reference_embeddings(subject)
        n = refs.shape[0]
        if n < 2:
            return float("nan")
        sims = refs @ refs.T
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


@contextmanager
def _root_logger_at_error() -> Iterator[None]:
    """open_clip warns "no pretrained weights" on the root logger for random towers; silence only that call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def load_clip(config: ProjectConfig, device: torch.device):
    """open_clip model + preprocess + tokenizer for the profile (random tiny tower offline, ViT-H-14 for sdxl)."""
    import open_clip

    if config.profile == "tiny":
        path = config.cache_path / f"{TINY_CLIP_NAME}.json"
        if not path.exists():
            write_text_atomic(path, json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(path)
        torch.manual_seed(0)
        with _root_logger_at_error():
            model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=None)
        return model, preprocess, open_clip.get_tokenizer(TINY_CLIP_NAME), f"{TINY_CLIP_NAME} (random weights)"
    arch, weights = SDXL_CLIP
    precision = "fp16" if device.type == "cuda" else "fp32"
    if config.profile == "sdxl-random":
        torch.manual_seed(0)
        with _root_logger_at_error():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device,
                                                                         precision=precision)
        return model, preprocess, open_clip.get_tokenizer(arch), f"{arch} (random weights)"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights, device=device,
                                                                     precision=precision)
    except Exception as e:  # hub unreachable, not cached, ...
        raise ModelUnavailableError(f"cannot load open_clip {arch}/{weights}: {type(e).__name__}. Fix: run where "
                                    f"huggingface.co is reachable, or use the offline profile "
                                    f"(HELPERS_PROFILE=tiny).") from None
    return model, preprocess, open_clip.get_tokenizer(arch), f"{arch}/{weights}"


class DinoScorer:
    """DINOv2 (transformers) image similarity, the identity metric DreamBooth papers report; sdxl profile only."""

    def __init__(self, references: dict[str, list[Image.Image]], device: torch.device | str | None = None):
        from transformers import AutoImageProcessor, AutoModel

        self.device = torch.device(device) if device else default_device()
        try:
            self.processor = AutoImageProcessor.from_pretrained(DINO_ID)
            self.model = AutoModel.from_pretrained(DINO_ID).to(self.device).eval()
        except Exception as e:
            raise ModelUnavailableError(f"cannot load {DINO_ID}: {type(e).__name__}") from None
        self.references = references
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
        features = self.model(**inputs).pooler_output.float()
        return features / features.norm(dim=-1, keepdim=True)

    def identity(self, image: Image.Image, subject: str) -> float:
        if subject not in self._cache:
            self._cache[subject] = self.embed_images(self.references[subject])
        return float((self.embed_images([image]) @ self._cache[subject].T).mean())


def optional_dino_scorer(config: ProjectConfig, scorer: ClipScorer) -> DinoScorer | None:
    """DINOv2 on the sdxl profile when its weights can be had, else None (the tiny profile has no DINO twin)."""
    if config.profile != "sdxl":
        return None
    try:
        check_hub_weights(DINO_ID, "config.json")
        return DinoScorer(scorer.references, scorer.device)
    except ModelUnavailableError as e:
        warnings.warn(f"DINO scores skipped: {e}")
        return None


class Evaluator:
    """The seed's API: ``Evaluator().compute_clip_score(image, text)`` on the usual 0-100 CLIP-score scale."""

    def __init__(self, scorer: ClipScorer | None = None, config: ProjectConfig | None = None):
        if scorer is None:
            from .config import make_config

            scorer = ClipScorer.for_config(config or make_config())
        self.scorer = scorer

    def compute_clip_score(self, image: Image.Image, text: str) -> float:
        """100 * max(cosine(image, text), 0), as torchmetrics' CLIPScore."""
        return 100.0 * max(self.scorer.prompt_score(image, text), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# thresholds
# ----------------------------------------------------------------------------------------------------------------
def subject_thresholds(scorer: Scorer, config: ProjectConfig) -> dict[str, float]:
    """Pass threshold per subject.

    ``calibrated`` (default): ``qa_calibration_fraction`` x the mean similarity between the subject's own reference
    photos. Raw cosine levels differ between scorers (ViT-H vs ViT-L vs a random tower) and between subjects (a
    plain mug's photos agree more than a cat's), so a threshold relative to how alike the references are carries over;
    a fixed number does not. ``fixed``: ``qa_pass_threshold`` for everyone. A subject with a single reference photo
    cannot be calibrated and falls back to the fixed threshold.
    """
    thresholds = {}
    for subject in config.subjects:
        reference = scorer.reference_similarity(subject.name) if config.qa_threshold_mode == "calibrated" else None
        if reference is None or not np.isfinite(reference):
            if config.qa_threshold_mode == "calibrated":
                warnings.warn(f"{subject.name}: one reference photo cannot calibrate a threshold; using the fixed "
                              f"qa_pass_threshold={config.qa_pass_threshold}")
            thresholds[subject.name] = config.qa_pass_threshold
        else:
            thresholds[subject.name] = config.qa_calibration_fraction * reference
    return thresholds


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SubjectScore:
    identity: float
    prompt: float
    leakage: dict[str, float]
    threshold: float

    @property
    def leaked_to(self) -> str | None:
        """Another subject whose references match this region better than its own do."""
        own = self.identity
        rivals = {name: s for name, s in self.leakage.items() if s > own}
        return max(rivals, key=rivals.get) if rivals else None

    @property
    def passed(self) -> bool:
        return self.identity >= self.threshold and self.leaked_to is None

    def reason(self) -> str:
        if self.identity < self.threshold:
            return f"identity {self.identity:.3f} < threshold {self.threshold:.3f}"
        if self.leaked_to:
            return f"region looks more like {self.leaked_to!r} ({self.leakage[self.leaked_to]:.3f})"
        return "passed"


def score_subject(scorer: Scorer, image: Image.Image, result: GenerationResult, subject: Subject,
                  threshold: float, margin: float) -> SubjectScore:
    crop = image.crop(crop_box_for(result.masks, subject.name, margin))
    row = scorer.leakage_row(crop)
    return SubjectScore(row[subject.name], scorer.prompt_score(crop, subject.class_prompt), row, threshold)


@dataclass
class QAOutcome:
    final: Image.Image
    log: list[dict] = field(default_factory=list)
    summary: dict[str, dict] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def save(self, folder: str | Path) -> Path:
        from .pipeline import save_image_atomic

        folder = Path(folder)
        save_image_atomic(self.final, folder / "final.png")
        write_text_atomic(folder / "qa_log.json", json.dumps(
            {"thresholds": self.thresholds, "summary": self.summary, "decisions": self.log,
             "seconds": self.seconds}, indent=2))
        return folder / "qa_log.json"

    def ablation_rows(self) -> list[dict]:
        """Per subject: score without the loop, with it, and what the loop did."""
        return [{"subject": name, "identity_before": round(s["before"], 4), "identity_after": round(s["after"], 4),
                 "threshold": round(self.thresholds[name], 4), "refinements": s["refinements"],
                 "kept_attempt": s["kept_attempt"], "passed": s["passed"]} for name, s in self.summary.items()]


def qa_loop(models: ModelBundle, result: GenerationResult, config: ProjectConfig, scorer: Scorer,
            thresholds: dict[str, float] | None = None) -> QAOutcome:
    """Score each subject of ``result.final``; refine failing ones (only their own region, only their own LoRA,
    emphasised prompt, a new seed per attempt), at most ``config.max_retries`` times; keep the best attempt."""
    start = time.perf_counter()
    thresholds = thresholds or subject_thresholds(scorer, config)
    outcome = QAOutcome(result.final, thresholds=thresholds)
    image = result.final
    for index, region in enumerate(result.layout.regions):
        subject = config.subject(region.subject)
        t0 = time.perf_counter()
        score = score_subject(scorer, image, result, subject, thresholds[subject.name], config.region_margin)
        best_score, best_image, best_attempt = score, image, 0
        outcome.log.append(_log_entry(subject, 0, None, score, "pass" if score.passed else "refine",
                                      time.perf_counter() - t0))
        attempt = 0
        while not best_score.passed and attempt < config.max_retries:
            attempt += 1
            t0 = time.perf_counter()
            seed = subject_seed(result.seed, index, attempt)
            candidate, _ = region_pass(models, config, image, result.masks, subject, seed, config.refine_strength,
                                       emphasis_weight=config.prompt_boost)
            cand_score = score_subject(scorer, candidate, result, subject, thresholds[subject.name],
                                       config.region_margin)
            better = (cand_score.passed, cand_score.identity) > (best_score.passed, best_score.identity)
            if better:
                best_score, best_image, best_attempt = cand_score, candidate, attempt
            decision = ("pass" if cand_score.passed else "retry" if attempt < config.max_retries else "give up")
            decision += f"; best so far: attempt {best_attempt}"
            outcome.log.append(_log_entry(subject, attempt, seed, cand_score, decision, time.perf_counter() - t0))
        image = best_image  # candidates differ from ``image`` only inside this subject's mask
        outcome.summary[subject.name] = {"before": score.identity, "after": best_score.identity,
                                         "refinements": attempt, "kept_attempt": best_attempt,
                                         "passed": best_score.passed, "reason": best_score.reason()}
    outcome.final = image
    outcome.seconds = time.perf_counter() - start
    return outcome


def _log_entry(subject: Subject, attempt: int, seed: int | None, score: SubjectScore, decision: str,
               seconds: float) -> dict:
    return {"subject": subject.name, "attempt": attempt, "seed": seed, "identity": round(score.identity, 6),
            "prompt_score": round(score.prompt, 6), "leakage": {k: round(v, 6) for k, v in score.leakage.items()},
            "threshold": round(score.threshold, 6), "passed": score.passed, "reason": score.reason(),
            "decision": decision, "seconds": round(seconds, 4)}


def score_table(scorer: Scorer, image: Image.Image, result: GenerationResult, config: ProjectConfig,
                thresholds: dict[str, float]) -> list[dict]:
    """One row per subject: identity, prompt score, threshold, pass/fail and why (no refinement)."""
    rows = []
    for region in result.layout.regions:
        subject = config.subject(region.subject)
        s = score_subject(scorer, image, result, subject, thresholds[subject.name], config.region_margin)
        rows.append({"subject": subject.name, **{k: v for k, v in asdict(s).items() if k != "leakage"},
                     "passed": s.passed, "reason": s.reason()})
    return rows
