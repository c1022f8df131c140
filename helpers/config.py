"""One config object for the whole series: subjects, paths, model profile, generation, training and QA settings.

Plain data: no torch, no printing, no file access, nothing else from ``helpers``. Every setting is declared once, with
its group, its range, whether it decides a LoRA's weights (``hashed``) and its per-profile defaults; the lists other
code needs (``HASHED_FIELDS``, ``PROFILE_DEFAULTS``, the validation) are derived from those declarations, so adding a
setting touches one line. Paths are stored relative to the project root so a config moves with the project.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("world", "tiny", "sdxl", "sdxl-random")
CONFIG_FILE = "config.json"

# The seed's defaults: two demo subjects and one pass threshold on the identity score (CLIP-I cosine).
QA_PASS_THRESHOLD = 0.70


@dataclass(frozen=True)
class Subject:
    """One personal subject: its folder of photos, the rare token that names it and where its LoRA goes.

    ``data_dir`` is relative to the project root (absolute paths work too); ``lora_dir`` is a folder inside the
    config's output folder, so a LoRA never lands outside it.
    """

    name: str
    token: str
    class_name: str
    data_dir: str
    lora_dir: str
    # an existing LoRA to use instead of training one (diffusers, kohya or A1111/ComfyUI .safetensors; relative to
    # the project root or absolute); empty: notebook 01 trains it from the photos
    lora_file: str = ""
    # mirror half of this subject's training views: True only for a subject that looks the same mirrored (more views,
    # no blend); None follows the config's ``random_flip``
    mirror: bool | None = None

    def mirrors_views(self, config_random_flip: bool) -> bool:
        return config_random_flip if self.mirror is None else self.mirror

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_name}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_name}"


def subject_from(value: Subject | dict) -> Subject:
    """A ``Subject`` from itself or from a dict (a notebook parameter): ``data_dir`` defaults to ``data/<name>`` and
    ``lora_dir`` to ``loras/<name>``."""
    if isinstance(value, Subject):
        return value
    if not isinstance(value, dict) or not {"name", "token", "class_name"} <= set(value):
        raise ValueError(f"ProjectConfig.subjects: each subject needs name, token and class_name, got {value!r}")
    unknown = set(value) - {"name", "token", "class_name", "data_dir", "lora_dir", "lora_file", "mirror"}
    if unknown:
        raise ValueError(f"ProjectConfig.subjects: unknown key(s) {', '.join(sorted(unknown))} in {value!r}")
    mirror = value.get("mirror")
    if mirror is not None and not isinstance(mirror, bool):
        raise ValueError(f"ProjectConfig.subjects: mirror must be true, false or absent, got {mirror!r} in {value!r}")
    name = str(value["name"])
    return Subject(name, str(value["token"]), str(value["class_name"]), str(value.get("data_dir", f"data/{name}")),
                   str(value.get("lora_dir", f"loras/{name}")), str(value.get("lora_file") or ""), mirror)


LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save/load_lora_weights use

SUBJECTS = [
    Subject("cat", "sks", "cat", "data/cat", "loras/cat"),
    Subject("mug", "zwx", "mug", "data/mug", "loras/mug"),
]
# The world profile's personal subjects: rendered photos of a cat and a mug whose look never occurs in its base data.
WORLD_SUBJECTS = [
    Subject("cat", "sks", "cat", "data/world/cat", "loras/cat"),
    Subject("mug", "zwx", "mug", "data/world/mug", "loras/mug"),
]

# Two subjects of one class, for the evaluation of whether each region keeps its own cat (``--preset two-cats``)
WORLD_TWO_CATS = [
    Subject("cat", "sks", "cat", "data/world/cat", "loras/cat"),
    Subject("cat2", "ohwx", "cat", "data/world/cat2", "loras/cat2"),
]
PRESETS: dict[str, dict[str, Any]] = {
    "two-cats": dict(subjects=WORLD_TWO_CATS, scene_prompt="a cat left of a cat on a wooden table, warm light",
                     extra_scene_prompts=["a cat left of a cat on grass, cool light",
                                          "a cat left of a cat under a night sky, neutral light"]),
}


def setting(default: Any, group: str, *, hashed: bool = False, low: float | None = None, high: float | None = None,
            above: float | None = None, below: float | None = None, choices: tuple | None = None,
            multiple_of: int | None = None, **profile_defaults: Any) -> Any:
    """A config field with everything the rest of the code derives from it.

    ``low``/``high`` are inclusive bounds, ``above``/``below`` exclusive; keyword arguments named after a profile
    (``tiny=64, sdxl=1024``) are that profile's default (``sdxl-random`` shares ``sdxl``'s).
    """
    meta = dict(group=group, hashed=hashed, low=low, high=high, above=above, below=below, choices=choices,
                multiple_of=multiple_of, kind=type(default), profiles=profile_defaults)
    return field(default=default, metadata=meta)


def list_setting(default: list[str], group: str, **profile_defaults: list[str]) -> Any:
    """A list-of-strings setting (copied per config, so no two configs share one list)."""
    meta = dict(group=group, hashed=False, low=None, high=None, above=None, below=None, choices=None,
                multiple_of=None, kind=list, profiles=profile_defaults)
    return field(default_factory=lambda: list(default), metadata=meta)


@dataclass
class ProjectConfig:
    """Everything a notebook needs to know. Flat on purpose: papermill parameters override fields by name."""

    profile: str = setting("tiny", "model", hashed=True, choices=PROFILES)
    subjects: list[Subject] = field(default_factory=lambda: list(SUBJECTS),
                                    metadata=dict(group="subjects", profiles={"world": WORLD_SUBJECTS}))
    output_dir: str = setting("output", "paths")
    cache_dir: str = setting("cache", "paths")  # relative to output_dir: the tiny model and class images live here
    # generation
    resolution: int = setting(64, "generation", low=8, multiple_of=8, tiny=64, sdxl=1024, world=128)
    steps: int = setting(4, "generation", low=1, tiny=4, sdxl=30, world=20)
    guidance_scale: float = setting(5.0, "generation", low=0.0)
    seed: int = setting(0, "generation", hashed=True, low=0)
    # names every subject by its class word (or {name}); every other prompt of a run derives from it (prompts.py)
    scene_prompt: str = setting("a cat and a mug on a wooden table, soft window light", "generation",
                                world="a cat left of a mug on a wooden table, warm light")
    negative_prompt: str = setting("blurry, deformed, low quality", "generation", world="")
    inpaint_strength: float = setting(0.85, "generation", above=0.0, high=1.0)
    # the schedule of every inpainting call (subject passes, refinements, ghost cleanup), of which a call runs its
    # strength's share; 0: the same as ``steps``. In the world (SDXL's Euler schedule) 14 instead of 20 changed
    # identity by +0.002 +- 0.012 after QA (96 subjects, development seeds) and 10 was worse (faded +0.125 +- 0.087):
    # SDXL's 16 stays above the 14 that held (a pass at 0.85 runs 13 steps, a refinement at 0.65 10)
    inpaint_steps: int = setting(0, "generation", low=0, tiny=0, sdxl=16, world=14)
    region_margin: float = setting(0.15, "generation", low=0.0, below=1.0)
    # RePaint's resampling (``pipeline.resampling_scheduler_class``): the first ``RESAMPLE_SHARE`` of an inpainting
    # call's steps each run this many times, renoised in between, so what is painted inside the mask can settle with
    # the picture around it (1: off). Costs (times - 1) x that share of the call's steps in extra UNet calls. In the
    # world 5 lifted the base model's inpainting gate (42.5 -> 54.2 % at 0.85, 60.8 -> 72.5 % at 1.0, the scorer of
    # then) but, with the subject LoRAs, 3 left identity after QA unchanged (+0.010 +- 0.013):
    # world_inpaint_resample_2026-12-04.md. The gate in tests/test_world.py asks for a whole object with it.
    inpaint_resample: int = setting(1, "generation", low=1)
    # a subject pass's cross-attention: the logits of the subject's class word raised by this much inside its mask
    # and lowered outside it (0: off). In the world it lifts the base model's inpainting gate (37.5 % -> 70.8 % at 4)
    # but costs identity with the subject LoRAs (-0.051 +- 0.021 after QA): world_ablation_cpu_2026-12-04_e.md
    region_attention: float = setting(0.0, "generation", low=0.0)
    feather_px: int = setting(0, "generation", low=0)  # 0: derived from the resolution (resolution // 32)
    # a subject pass applies its LoRA at this multiple of its trained strength (diffusers' ``lora_scale``)
    subject_lora_scale: float = setting(1.0, "generation", above=0.0)
    # a subject pass also has every other class of ``class_vocabulary`` in its negative prompt
    # (pipeline.pass_negative_prompt)
    pass_negative_classes: bool = setting(False, "generation")
    fuse_subject_lora: bool = setting(True, "generation")  # merge the subject's LoRA into the UNet for its pass
    # subject passes as one batched call, each sample with only its own LoRA (pipeline.pass_batches): "disjoint"
    # batches passes whose crops do not overlap (same pixels as sequential), "all" every pass of one strength (each
    # sees its neighbours' regions as Phase 0 left them), "off" one pass after another
    batch_subject_passes: str = setting("all", "generation", choices=("off", "disjoint", "all"))
    # a subject pass runs at its crop's own size (UNet work grows with the pixels), never below this: SDXL draws
    # poorly under ~768 px. The small profiles keep their one native size.
    subject_pass_min_size: int = setting(64, "generation", low=8, multiple_of=8, tiny=64, sdxl=768, world=128)
    # Phase 0's objects of a subject's class outside every region (ghosts) are found and painted over with the scene's
    # setting before the subject passes, at most this many rounds (0: leave them)
    ghost_cleanup_rounds: int = setting(2, "generation", low=0)
    # torch.compile the UNet (static graphs: minutes of warm-up for each new image size or batch, then faster calls;
    # passes run at two sizes only, fused weights change values, not graphs)
    compile_unet: bool = setting(False, "generation")
    # training
    train_steps: int = setting(40, "training", hashed=True, low=1, tiny=40, sdxl=500, world=1000)
    train_resolution: int = setting(64, "training", hashed=True, low=8, multiple_of=8, tiny=64, sdxl=1024,
                                    world=128)
    train_batch_size: int = setting(2, "training", hashed=True, low=1, tiny=2, sdxl=1, world=4)
    lora_rank: int = setting(4, "training", hashed=True, low=1, tiny=4, sdxl=16, world=8)
    lora_alpha: int = setting(0, "training", hashed=True, low=0)  # 0: same as rank
    learning_rate: float = setting(1e-4, "training", hashed=True, above=0.0, world=1e-3)
    min_snr_gamma: float = setting(5.0, "training", hashed=True, low=0.0)  # 0 disables min-SNR weighting
    # the loss weight of a photo's pixels outside its subject mask ("cat_0.mask.png" beside "cat_0.png"; photos
    # without masks train on every pixel): below 1 the LoRA learns the subject more than its photos' backgrounds.
    # In the world 0 and 0.1 faded more after QA (+0.15, benchmarks/results), so it is off (1) by default. In the
    # LoRA's fingerprint with the masks' bytes only when below 1, so LoRAs trained without it stay current
    mask_background_weight: float = setting(1.0, "training", low=0.0, high=1.0)
    # half of the training views mirrored left-right (diffusers' DreamBooth scripts: off unless asked). A subject
    # that is not mirror-symmetric (text, a logo, a patch on one side, diagonal stripes) is then learned as a blend of
    # itself and its mirror image: in the world the mug's LoRA drew its stripes both ways and passed QA in 27 % of
    # regions instead of 77 % (development seeds 20,000+, benchmarks/results/world_lora_flip_cpu_2026-12-05.md).
    # In the LoRA's fingerprint only when off
    random_flip: bool = setting(False, "training")
    prior_preservation: bool = setting(False, "training", hashed=True)
    prior_loss_weight: float = setting(1.0, "training", hashed=True, low=0.0)
    num_class_images: int = setting(4, "training", hashed=True, low=0, tiny=4, sdxl=50, world=8)
    checkpoint_every: int = setting(8, "training", low=1, tiny=8, sdxl=100, world=50)
    # "auto": off where the faster setting fits in the free GPU memory with a margin (training.checkpointing_choice)
    gradient_checkpointing: str = setting("auto", "training", choices=("auto", "on", "off"))
    # QA
    qa_pass_threshold: float = setting(QA_PASS_THRESHOLD, "qa", low=-1.0, high=1.0)
    qa_threshold_mode: str = setting("calibrated", "qa", choices=("calibrated", "fixed"))
    qa_calibration_fraction: float = setting(0.8, "qa", above=0.0, high=1.0)
    # refinement rounds per failing subject, each with ``qa_candidates`` passes from their own seeds (batched), the best
    # kept. In the world (NVIDIA H200, development seeds 20,000+, world_ablation_h200_2026-12-04_g.md) 8 rounds x 3
    # left 0.094 of the subjects faded instead of 0.260 with 4 x 1 (paired -0.167 +- 0.091), class presence 1.00, for
    # 1.8x the time of a picture; a subject that passes early costs nothing more. The tiny plumbing profile keeps
    # 2 x 1 (its runs are tests)
    max_retries: int = setting(8, "qa", low=0, tiny=2)
    qa_candidates: int = setting(3, "qa", low=1, tiny=1)
    refine_strength: float = setting(0.65, "qa", above=0.0, high=1.0)
    # a region that does not show its subject's class at all is painted anew at this strength (the first pass's
    # 0.85 keeps some of what is there: in an empty region, the background)
    repaint_strength: float = setting(0.85, "qa", above=0.0, high=1.0)
    # a region whose inner edge no longer shows the scene around it (a split world) fails QA and is painted again
    qa_setting_rule: bool = setting(True, "qa")
    prompt_boost: float = setting(1.3, "qa", above=0.0)
    # evaluation
    eval_seeds: int = setting(2, "evaluation", low=1, tiny=2, sdxl=4, world=8)
    eval_prompts: int = setting(1, "evaluation", low=1, tiny=1, sdxl=3, world=3)
    # evaluation seeds start here: far from every seed used while developing and testing (those stay below 100,000),
    # so the report measures pictures nobody tuned anything on. Moved on whenever a range was used to choose between
    # changes: 3,000,000+ (reports until 2026-12-02), 4,000,000+ (the ablations of 2026-12-03), 5,000,000+ (the
    # report of 2026-12-03, then the LoRA recipe and max_retries chosen on it)
    eval_seed_start: int = setting(6_000_000, "evaluation", low=0)
    # more scenes for the evaluation, after scene_prompt (indoor, outdoor, night);
    # "{subjects}" becomes "a cat and a mug"
    extra_scene_prompts: list[str] = list_setting(
        ["{subjects} in a sunny garden", "{subjects} on a balcony at night, city lights"], "evaluation",
        world=["a cat left of a mug on grass, cool light", "a cat left of a mug under a night sky, neutral light"])
    # the classes a region's object is named among (class presence, ghosts); the subjects' classes are added
    class_vocabulary: list[str] = list_setting(
        ["person", "dog", "cat", "bird", "mug", "cup", "bottle", "vase", "plant", "flower", "book", "lamp", "chair",
         "toy", "teddy bear", "ball", "box", "bag", "shoe", "hat", "car", "tree", "fruit", "clock"], "evaluation",
        world=["cat", "mug", "ball", "box", "tree"])

    def __post_init__(self) -> None:
        self.subjects = [subject_from(s) for s in self.subjects]
        self.validate()

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that has the wrong type or is out of its range."""
        for f in fields(self):
            if "kind" in f.metadata:
                problem = check_setting(getattr(self, f.name), f.metadata)
                if problem:
                    raise ValueError(f"ProjectConfig.{f.name}: {problem}")
        self._validate_subjects()

    def _validate_subjects(self) -> None:
        def fail(why: str) -> None:
            raise ValueError(f"ProjectConfig.subjects: {why}")

        if not self.subjects:
            fail("at least one subject is needed")
        for attr in ("name", "token", "lora_dir", "data_dir"):  # a shared lora_dir would overwrite one LoRA
            values = [getattr(s, attr) for s in self.subjects]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                fail(f"duplicate subject {attr}(s): {', '.join(dupes)}; each subject needs its own")
        for s in self.subjects:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", s.name):
                fail(f"subject name {s.name!r} must be letters, digits, '_' or '-' (it names folders)")
            if not s.token.strip() or not s.class_name.strip():
                fail(f"subject {s.name!r} needs a token and a class_name")
            lora_dir = Path(s.lora_dir)
            if lora_dir.is_absolute() or ".." in lora_dir.parts or not lora_dir.parts:
                fail(f"subject {s.name!r}: lora_dir {s.lora_dir!r} must be a folder inside the output folder "
                     f"(relative, without '..'), e.g. 'loras/{s.name}'")

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

    @property
    def config_file(self) -> Path:
        return self.output_path / CONFIG_FILE

    def lora_path(self, subject: Subject) -> Path:
        return self.output_path / subject.lora_dir

    def data_path(self, subject: Subject) -> Path:
        return self.path(subject.data_dir)

    def lora_file_path(self, subject: Subject) -> Path:
        """The LoRA file notebook 03 loads for ``subject``: its own ``lora_file`` when given, else the trained one."""
        if subject.lora_file:
            return self.path(subject.lora_file)
        return self.lora_path(subject) / LORA_WEIGHTS_FILE

    def subject(self, name: str) -> Subject:
        for s in self.subjects:
            if s.name == name:
                return s
        raise KeyError(f"no subject named {name!r}; configured: {', '.join(self.subject_names)}")

    @property
    def subject_names(self) -> list[str]:
        return [s.name for s in self.subjects]

    @property
    def effective_inpaint_steps(self) -> int:
        return self.inpaint_steps or self.steps

    @property
    def effective_feather_px(self) -> int:
        return self.feather_px or max(2, self.resolution // 32)

    def presence_classes(self) -> list[str]:
        """``class_vocabulary`` with every subject's class (each once, in order)."""
        return list(dict.fromkeys([*self.class_vocabulary, *(s.class_name for s in self.subjects)]))

    def hashed_settings(self) -> dict[str, Any]:
        """The settings that decide a LoRA's weights (part of its training fingerprint)."""
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def summary(self) -> str:
        own_choice = {None: "", True: ", mirrored views", False: ", no mirrored views"}
        subjects = ", ".join(f"{s.name} ({s.token} {s.class_name}{own_choice[s.mirror]})" for s in self.subjects)
        return (f"profile={self.profile} resolution={self.resolution} steps={self.steps} seed={self.seed}\n"
                f"subjects: {subjects}\n"
                f"train: steps={self.train_steps} rank={self.lora_rank} lr={self.learning_rate:g} "
                f"random_flip={self.random_flip}\n"
                f"qa: mode={self.qa_threshold_mode} threshold={self.qa_pass_threshold} "
                f"max_retries={self.max_retries} candidates={self.qa_candidates} "
                f"refine_strength={self.refine_strength}")

    # -- plain-data conversion ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "ProjectConfig") -> ProjectConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of settings, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in OBSOLETE_FIELDS}
        check_known_fields(data, source)
        try:
            return cls(**data)
        except (ValueError, TypeError) as e:
            if source == "ProjectConfig":
                raise
            raise ValueError(f"{source}: {str(e).removeprefix('ProjectConfig.')}; fix it, or delete the file to start "
                             f"from the defaults") from None

    @classmethod
    def from_json(cls, text: str, source: str = "ProjectConfig") -> ProjectConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e}); delete it or fix it") from None
        return cls.from_dict(data, source)

    def replace(self, **changes: Any) -> ProjectConfig:
        check_known_fields(changes, "ProjectConfig")
        return dataclasses.replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in fields(ProjectConfig))
# settings of earlier versions that a saved config.json may still hold; read and dropped (the pass prompts now come
# from the scene prompt, so the fixed suffix has no use)
OBSOLETE_FIELDS = frozenset({"subject_prompt_suffix"})
HASHED_FIELDS = tuple(f.name for f in fields(ProjectConfig) if f.metadata.get("hashed"))
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    profile: {f.name: f.metadata["profiles"][profile] for f in fields(ProjectConfig)
              if profile in f.metadata.get("profiles", {})}
    for profile in ("world", "tiny", "sdxl")
}
PROFILE_DEFAULTS["sdxl-random"] = PROFILE_DEFAULTS["sdxl"]


def check_known_fields(names: dict[str, Any] | list[str], source: str) -> None:
    """``ValueError`` listing names that are not settings (with the closest known names)."""
    import difflib

    unknown = sorted(set(names) - set(FIELD_NAMES))
    if unknown:
        hints = [f"{name} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(name, FIELD_NAMES))
                 else name for name in unknown]
        raise ValueError(f"{source}: unknown field(s) {', '.join(hints)}")


def check_setting(value: Any, meta: dict[str, Any]) -> str | None:
    """Why ``value`` does not fit the setting described by ``meta`` (type first, then range), or None."""
    kind = meta["kind"]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        return f"must be {'a finite number' if kind is float else f'{article} {kind.__name__}'}, got {value!r}"
    if kind is list and not all(isinstance(item, str) for item in value):
        return f"must be a list of strings, got {value!r}"
    if meta["choices"] is not None and value not in meta["choices"]:
        return f"must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}"
    bounds = [(meta["low"], lambda v, b: v >= b, ">="), (meta["high"], lambda v, b: v <= b, "<="),
              (meta["above"], lambda v, b: v > b, ">"), (meta["below"], lambda v, b: v < b, "<")]
    for bound, holds, symbol in bounds:
        if bound is not None and not holds(value, bound):
            return f"must be {symbol} {bound}, got {value!r}"
    if meta["multiple_of"] and value % meta["multiple_of"]:
        return f"must be a multiple of {meta['multiple_of']} (the VAE downsamples by 8), got {value!r}"
    return None
