"""One config object for the whole series: subjects, paths, model profile, generation, training and QA settings.

Plain data: this module imports nothing else from ``helpers``. Paths are stored relative to the project root so a
config JSON moves with the project (Colab, a laptop, CI).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("tiny", "sdxl", "sdxl-random")
CONFIG_FILE = "config.json"

# The seed's defaults: two demo subjects and one pass threshold on the identity score (CLIP-I cosine).
QA_PASS_THRESHOLD = 0.70


@dataclass(frozen=True)
class Subject:
    """One personal subject: its folder of photos, the rare token that names it and where its LoRA goes.

    ``data_dir`` is relative to the project root, ``lora_dir`` to the config's output folder (absolute paths work too).
    """

    name: str
    token: str
    class_name: str
    data_dir: str
    lora_dir: str

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_name}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_name}"


SUBJECTS = [
    Subject("cat", "sks", "cat", "data/cat", "loras/cat"),
    Subject("mug", "zwx", "mug", "data/mug", "loras/mug"),
]

# Settings whose sensible value depends on the model size; everything else is shared.
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(resolution=64, steps=4, train_steps=40, train_resolution=64, lora_rank=4, train_batch_size=2,
                 checkpoint_every=8, num_class_images=4, eval_seeds=2, eval_prompts=1),
    "sdxl": dict(resolution=1024, steps=30, train_steps=500, train_resolution=1024, lora_rank=16,
                 train_batch_size=1, checkpoint_every=100, num_class_images=50, eval_seeds=4, eval_prompts=2),
}
PROFILE_DEFAULTS["sdxl-random"] = PROFILE_DEFAULTS["sdxl"]


@dataclass
class ProjectConfig:
    """Everything a notebook needs to know. Flat on purpose: papermill parameters override fields by name."""

    profile: str = "tiny"
    subjects: list[Subject] = field(default_factory=lambda: list(SUBJECTS))
    output_dir: str = "output"
    cache_dir: str = "cache"  # relative to output_dir: the tiny model and cached class images live here
    # generation
    resolution: int = 64
    steps: int = 4
    guidance_scale: float = 5.0
    seed: int = 0
    scene_prompt: str = "a cat and a mug on a wooden table, soft window light"
    negative_prompt: str = "blurry, deformed, low quality"
    subject_prompt_suffix: str = "on a wooden table, soft window light"
    inpaint_strength: float = 0.85
    region_margin: float = 0.15
    feather_px: int = 0  # 0: derived from the resolution (resolution // 32)
    # training
    train_steps: int = 40
    train_resolution: int = 64
    train_batch_size: int = 2
    lora_rank: int = 4
    lora_alpha: int = 0  # 0: same as rank
    learning_rate: float = 1e-4
    min_snr_gamma: float = 5.0  # 0 disables min-SNR weighting
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 4
    checkpoint_every: int = 8
    gradient_checkpointing: bool = True
    # QA
    qa_pass_threshold: float = QA_PASS_THRESHOLD
    qa_threshold_mode: str = "calibrated"  # or "fixed"
    qa_calibration_fraction: float = 0.8
    max_retries: int = 2
    refine_strength: float = 0.65
    prompt_boost: float = 1.3
    # evaluation
    eval_seeds: int = 2
    eval_prompts: int = 1

    def __post_init__(self) -> None:
        self.subjects = [s if isinstance(s, Subject) else Subject(**s) for s in self.subjects]
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"ProjectConfig.{name}: {why}")

        if self.profile not in PROFILES:
            fail("profile", f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)} (or 'auto')")
        if not self.subjects:
            fail("subjects", "at least one subject is needed")
        for attr in ("name", "token"):
            values = [getattr(s, attr) for s in self.subjects]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                fail("subjects", f"duplicate subject {attr}(s): {', '.join(dupes)}")
        for s in self.subjects:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", s.name):
                fail("subjects", f"subject name {s.name!r} must be letters, digits, '_' or '-' (it names folders)")
            if not s.token.strip() or not s.class_name.strip():
                fail("subjects", f"subject {s.name!r} needs a token and a class_name")
        for name in ("resolution", "train_resolution"):
            value = getattr(self, name)
            if value <= 0 or value % 8:
                fail(name, f"must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
        for name in ("steps", "train_steps", "train_batch_size", "lora_rank", "checkpoint_every", "eval_seeds",
                     "eval_prompts"):
            if getattr(self, name) <= 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in ("max_retries", "lora_alpha", "num_class_images", "feather_px", "min_snr_gamma", "seed"):
            if getattr(self, name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("inpaint_strength", "refine_strength", "qa_calibration_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(name, f"must be in (0, 1], got {getattr(self, name)}")
        if not -1.0 <= self.qa_pass_threshold <= 1.0:
            fail("qa_pass_threshold", f"is a cosine similarity, must be in [-1, 1], got {self.qa_pass_threshold}")
        if self.qa_threshold_mode not in ("calibrated", "fixed"):
            fail("qa_threshold_mode", f"must be 'calibrated' or 'fixed', got {self.qa_threshold_mode!r}")
        if not 0.0 <= self.region_margin < 1.0:
            fail("region_margin", f"must be in [0, 1), got {self.region_margin}")
        if self.learning_rate <= 0 or self.guidance_scale < 0 or self.prompt_boost <= 0:
            fail("learning_rate/guidance_scale/prompt_boost", "learning_rate and prompt_boost > 0, guidance >= 0")

    # -- derived values -----------------------------------------------------------------------------------------
    def path(self, relative: str | Path) -> Path:
        """A project path: relative ones are taken from the project root, not from the notebook's folder."""
        p = Path(relative)
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def output_path(self) -> Path:
        return self.path(self.output_dir)

    @property
    def cache_path(self) -> Path:
        return self.output_path / self.cache_dir

    def lora_path(self, subject: Subject) -> Path:
        return self.output_path / subject.lora_dir

    def data_path(self, subject: Subject) -> Path:
        return self.path(subject.data_dir)

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise KeyError(f"no subject named {name!r}; configured: {', '.join(self.subject_names)}")

    @property
    def subject_names(self) -> list[str]:
        return [s.name for s in self.subjects]

    @property
    def effective_feather_px(self) -> int:
        return self.feather_px or max(2, self.resolution // 32)

    def summary(self) -> str:
        subjects = ", ".join(f"{s.name} ({s.token} {s.class_name})" for s in self.subjects)
        return (f"profile={self.profile} resolution={self.resolution} steps={self.steps} seed={self.seed}\n"
                f"subjects: {subjects}\n"
                f"train: steps={self.train_steps} rank={self.lora_rank} lr={self.learning_rate:g}\n"
                f"qa: mode={self.qa_threshold_mode} threshold={self.qa_pass_threshold} "
                f"max_retries={self.max_retries} refine_strength={self.refine_strength}")

    # -- io -----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProjectConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ProjectConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path else self.output_path / CONFIG_FILE
        write_text_atomic(target, json.dumps(self.to_dict(), indent=2))
        return target

    @classmethod
    def load(cls, path: str | Path) -> ProjectConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); delete it or fix it") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ProjectConfig:
        return dataclasses.replace(self, **changes)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` (same suffix, so writers infer the format); when the block succeeds it replaces
    ``path`` in one rename, so a crash never leaves half a file behind; on error the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def resolve_profile(profile: str = "auto") -> str:
    """'auto' means sdxl on a CUDA machine and tiny elsewhere; HELPERS_PROFILE overrides 'auto'."""
    if profile == "auto":
        profile = os.environ.get("HELPERS_PROFILE", "").strip() or "auto"
    if profile == "auto":
        import torch  # local: keep this module importable without torch for plain config work

        profile = "sdxl" if torch.cuda.is_available() else "tiny"
    if profile not in PROFILES:
        raise ValueError(f"ProjectConfig.profile: unknown profile {profile!r}; choose one of "
                         f"{', '.join(PROFILES)} or 'auto'")
    return profile


def make_config(profile: str = "auto", output_dir: str | None = None, **overrides: Any) -> ProjectConfig:
    """The config a notebook runs with.

    Starts from ``<output_dir>/config.json`` when an earlier notebook saved one for the same profile (so settings
    flow down the series), else from the profile's defaults; then applies every override that is not None.
    ``HELPERS_OUTPUT_DIR`` redirects the output folder (the tests use it to keep their runs apart).
    """
    profile = resolve_profile(profile)
    output_dir = output_dir or os.environ.get("HELPERS_OUTPUT_DIR") or "output"
    saved = ProjectConfig(profile=profile).path(output_dir) / CONFIG_FILE
    base = ProjectConfig.load(saved) if saved.exists() else None
    if base is None or base.profile != profile:
        base = ProjectConfig(profile=profile, **PROFILE_DEFAULTS[profile])
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in fields(ProjectConfig)})
    if unknown:
        raise ValueError(f"ProjectConfig: unknown field(s) {', '.join(unknown)}")
    return base.replace(output_dir=output_dir, **changes)


def notebook_config(notebook: str, profile: str = "auto", output_dir: str | None = None,
                    **overrides: Any) -> ProjectConfig:
    """A notebook's first step: resolve the profile, build the config, save it for the next notebook, say which
    profile runs (every notebook prints it)."""
    config = make_config(profile, output_dir, **overrides)
    config.save()
    note = " (random weights: pictures are meaningless, the plumbing is real)" if config.profile != "sdxl" else ""
    print(f"[{notebook}] profile: {config.profile}{note}; output: {config.output_path}")
    return config
