"""Scorers that turn a picture into numbers: the ``Scorer`` protocol the QA loop needs, open_clip CLIP-I / CLIP-T
(the world's own tower offline, ViT-H-14 on the sdxl profile), optional DINOv2, and the seed's
``Evaluator().compute_clip_score(image, text)``. Used by ``qa`` and ``evaluation``; knows nothing of either.
"""
from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from PIL import Image, ImageOps

from .config import ProjectConfig
from .data import load_subject_photos
from .io import write_text_atomic
from .measures import name_object
from .models import default_device
from .notebook import make_config
from .profiles import WORLD_DIR, WORLD_SCORER_NAME, ModelUnavailableError, check_hub_weights

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
    """What the QA loop needs from a scorer; tests pass one whose answers they control.

    ``leakage_row(crop, region_subject)``: the crop's identity score against every subject's references; the
    region's own subject is named so that a scorer may depend on it (the CLIP scorer does not need to).
    """

    subject_names: list[str]

    def leakage_row(self, image: Image.Image, region_subject: str) -> dict[str, float]: ...

    def prompt_score(self, image: Image.Image, text: str) -> float: ...

    def reference_similarity(self, subject: str) -> float: ...

    def name_class(self, image: Image.Image, classes: list[str]) -> str | None: ...


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

    def leakage_row(self, image: Image.Image, region_subject: str | None = None) -> dict[str, float]:
        crop = self.embed_images([image])
        return {s: float((crop @ self.reference_embeddings(s).T).mean()) for s in self.subject_names}

    def identity(self, image: Image.Image, subject: str) -> float:
        return float((self.embed_images([image]) @ self.reference_embeddings(subject).T).mean())

    def prompt_score(self, image: Image.Image, text: str) -> float:
        return float((self.embed_images([image]) @ self.text_embeddings([text]).T).item())

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """The texts' embeddings, each computed once (the QA loop and zero-shot naming ask for the same texts)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_embeddings]
        if missing:
            self._text_embeddings.update(zip(missing, self.embed_texts(missing)[:, None]))
        return torch.cat([self._text_embeddings[t] for t in texts])

    def name_class(self, image: Image.Image, classes: list[str]) -> str | None:
        """The class (among ``classes``) of the object located in ``image``; None when nothing stands out."""
        return name_object(self, image, classes)

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
    if config.profile == "world":
        scorer_dir = WORLD_DIR / "scorer"
        open_clip.add_model_config(scorer_dir / f"{WORLD_SCORER_NAME}.json")
        weights_file = scorer_dir / f"{WORLD_SCORER_NAME}.safetensors"
        if not weights_file.exists():
            raise ModelUnavailableError(f"the world scorer is missing: {weights_file}; restore it from git")
        model, _, preprocess = open_clip.create_model_and_transforms(WORLD_SCORER_NAME, pretrained=str(weights_file))
        return model.float(), preprocess, open_clip.get_tokenizer(WORLD_SCORER_NAME), f"{WORLD_SCORER_NAME} (trained)"
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


@dataclass(frozen=True)
class MirrorCheck:
    """Whether a subject looks the same mirrored, to the scorer: ``own`` is how much a photo resembles the subject's
    other photos, ``mirrored`` how much a mirrored photo does. Where it is lower the subject has a handedness (the
    world's mug: stripes one diagonal), and its LoRA must not train on mirrored views (``Subject.mirror``). A "yes" is
    advice: the world's scorer did not see a red band painted on one side of the cat's photos."""

    subject: str
    own: float
    mirrored: float

    @property
    def looks_the_same_mirrored(self) -> bool:
        return self.mirrored >= self.own - MIRROR_TOLERANCE


# Set on the world's subjects (cats +0.02 and +0.03 over their own photos, the mug with diagonal stripes -0.13): the
# world's scorer; for ViT-H-14 on real photos uncalibrated, so the check advises and the user decides
MIRROR_TOLERANCE = 0.03


def mirror_check(scorer: ClipScorer, subject: str) -> MirrorCheck:
    """Each photo and its mirror image against the subject's other photos (needs two photos or more)."""
    photos = scorer.references[subject]
    if len(photos) < 2:
        raise ValueError(f"mirror check: {subject} has {len(photos)} photo; it needs two or more to compare")
    own = scorer.reference_embeddings(subject)
    mirrored = scorer.embed_images([ImageOps.mirror(p.convert("RGB")) for p in photos])
    others = ~torch.eye(len(photos), dtype=torch.bool, device=own.device)
    return MirrorCheck(subject, scorer.reference_similarity(subject), float((mirrored @ own.T)[others].mean()))


class Evaluator:
    """The seed's API: ``Evaluator().compute_clip_score(image, text)`` on the usual 0-100 CLIP-score scale."""

    def __init__(self, scorer: ClipScorer | None = None, config: ProjectConfig | None = None):
        if scorer is None:
            scorer = ClipScorer.for_config(config or make_config())
        self.scorer = scorer

    def compute_clip_score(self, image: Image.Image, text: str) -> float:
        """100 * max(cosine(image, text), 0), as torchmetrics' CLIPScore."""
        return 100.0 * max(self.scorer.prompt_score(image, text), 0.0)
