"""The world's renderer: the data the ``world`` profile's models are trained on (``helpers.world`` re-exports it).

128x128 RGB scenes, deterministic from a seed: one of four backgrounds, a global light (warm / cool / neutral tint and
a brightness, applied to the whole picture, objects included), and 1-3 objects of five classes with distinct
silhouettes, each with a colour, a pattern, a size and a position. Every scene comes with an English caption that
names each object's colour, pattern and class, their order from left to right (or a single object's rough
position), the background and the light. Two *personal subjects* (a cat and a mug) have a look that never occurs in
the base data: an attribute combination excluded from it plus a distinctive mark no base object carries.

No model here: numpy and PIL only, so tests, evaluation and the trainer share one renderer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 2  # drawn at 256 px and downsampled: smooth edges, like a photo rather than pixel art
CLASSES = ("cat", "mug", "ball", "box", "tree")
COLORS = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (235, 210, 40), "green": (50, 160, 60),
    "blue": (40, 80, 200), "purple": (130, 60, 170), "white": (235, 235, 235), "black": (35, 35, 35),
}
PATTERNS = ("solid", "striped", "dotted")
BACKGROUNDS = {  # name -> how a caption places things on it
    "wooden table": "on a wooden table", "grass": "on grass", "night sky": "under a night sky",
    "plain wall": "in front of a plain wall",
}
LIGHTS = {"warm": (1.10, 1.00, 0.82), "cool": (0.84, 0.95, 1.12), "neutral": (1.0, 1.0, 1.0)}
POSITIONS = ("on the left", "in the middle", "on the right")


@dataclass(frozen=True)
class WorldObject:
    cls: str
    color: str
    pattern: str
    cx: float  # centre, fraction of the width
    cy: float  # centre, fraction of the height
    size: float  # side of the object's box, fraction of the image
    facing: int = 1  # +1 right, -1 left (cat head, mug handle)
    mark: str | None = None  # a personal subject's distinctive mark ("star", "heart")
    mark_color: str | None = None  # one of COLORS; None: the mark's own colour (MARK_COLORS)

    def box(self, size: int = SIZE) -> tuple[int, int, int, int]:
        half = self.size * size / 2
        return (int(self.cx * size - half), int(self.cy * size - half), int(math.ceil(self.cx * size + half)),
                int(math.ceil(self.cy * size + half)))

    def describe(self, rng: random.Random | None = None, drop: float = 0.0) -> str:
        """"red striped cat"; with ``rng``/``drop`` each attribute word is left out with that probability, so that
        prompts that do not name a colour or pattern are in the data too."""
        words = []
        if not (rng and rng.random() < drop):
            words.append(self.color)
        if self.pattern != "solid" and not (rng and rng.random() < drop):
            words.append(self.pattern)
        return " ".join([*words, self.cls])


@dataclass(frozen=True)
class SceneSpec:
    background: str
    light: str
    brightness: float
    objects: tuple[WorldObject, ...]
    texture_seed: int = 0


@dataclass
class Scene:
    image: Image.Image
    caption: str
    spec: SceneSpec
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# personal subjects: looks that never occur in the base data
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PersonalSubject:
    name: str
    cls: str
    color: str
    pattern: str
    mark: str

    def as_object(self, cx: float, cy: float, size: float, facing: int = 1) -> WorldObject:
        return WorldObject(self.cls, self.color, self.pattern, cx, cy, size, facing, self.mark)


PERSONAL_SUBJECTS = {
    "cat": PersonalSubject("cat", "cat", "purple", "dotted", "star"),
    "mug": PersonalSubject("mug", "mug", "orange", "striped", "heart"),
    # a second cat, for scenes with two subjects of one class: its pattern and its mark occur in no base object
    "cat2": PersonalSubject("cat2", "cat", "white", "checked", "diamond"),
}
# looks the base data leaves out (the second cat's pattern is not among PATTERNS at all, so sampling never meets it)
EXCLUDED_LOOKS = {(s.cls, s.color, s.pattern) for s in PERSONAL_SUBJECTS.values() if s.pattern in PATTERNS}


# ----------------------------------------------------------------------------------------------------------------
# sampling scenes and captions
# ----------------------------------------------------------------------------------------------------------------
def sample_object(rng: random.Random, cx: float, cy: float, size: float) -> WorldObject:
    while True:
        obj = WorldObject(rng.choice(CLASSES), rng.choice(list(COLORS)), rng.choice(PATTERNS), cx, cy, size,
                          rng.choice((-1, 1)))
        if (obj.cls, obj.color, obj.pattern) not in EXCLUDED_LOOKS:
            return obj


def sample_spec(rng: random.Random, n_objects: int | None = None) -> SceneSpec:
    """A random scene: 1-3 objects side by side (left to right), never overlapping."""
    n = n_objects or rng.choice((1, 1, 2, 2, 3))
    size_range = {1: (0.35, 0.6), 2: (0.28, 0.4), 3: (0.22, 0.3)}[n]
    sizes = [rng.uniform(*size_range) for _ in range(n)]
    slack = max(0.0, 0.96 - sum(sizes))
    gaps = [rng.random() for _ in range(n + 1)]
    gaps = [slack * g / sum(gaps) for g in gaps]
    x, objects = 0.02 + gaps[0], []
    for i, size in enumerate(sizes):
        cy = rng.uniform(0.45, 0.72) if n > 1 else rng.uniform(0.35, 0.65)
        cy = min(max(cy, size / 2 + 0.02), 0.98 - size / 2)
        objects.append(sample_object(rng, x + size / 2, cy, size))
        x += size + gaps[i + 1]
    return SceneSpec(rng.choice(list(BACKGROUNDS)), rng.choice(list(LIGHTS)), rng.uniform(0.85, 1.1),
                     tuple(objects), rng.randrange(2**31))


def with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def position_words(obj: WorldObject) -> str:
    return POSITIONS[min(2, int(obj.cx * 3))]


def caption(spec: SceneSpec, rng: random.Random | None = None, drop: float = 0.0) -> str:
    """The scene in plain English; with ``rng``/``drop``, attribute words, a single object's position and the light
    are each left out at random (the model then also learns prompts that say less)."""
    def keep() -> bool:
        return not (rng and rng.random() < drop)

    names = [with_article(o.describe(rng, drop)) for o in spec.objects]
    if len(names) == 1:
        things = names[0] + (f" {position_words(spec.objects[0])}" if keep() else "")
    elif len(names) == 2:
        things = f"{names[0]} left of {names[1]}"
    else:
        things = f"{', '.join(names[:-1])} and {names[-1]}"
    text = f"{things} {BACKGROUNDS[spec.background]}"
    return f"{text}, {spec.light} light" if keep() else text


# ----------------------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------------------
def _background(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    yy = np.linspace(0, 1, size)[:, None, None]
    if name == "wooden table":
        base = np.array([150, 100, 60], np.float32) * (0.9 + 0.15 * yy)
        grain = np.sin(np.linspace(0, rng.uniform(25, 40), size) + rng.uniform(0, 6))[:, None, None]
        img = base * (1 + 0.08 * grain) * np.ones((size, size, 1))
    elif name == "grass":
        img = np.array([70, 140, 60], np.float32) * (0.85 + 0.25 * yy) * np.ones((size, size, 1))
        blades = rng.random((size // 4, size)) < 0.25
        img[np.repeat(blades, 4, axis=0)] *= 0.8
    elif name == "night sky":
        img = np.array([20, 25, 60], np.float32) * (1.3 - 0.5 * yy) * np.ones((size, size, 1))
        for _ in range(40):
            y, x = rng.integers(0, size - 2, 2)
            img[y:y + 2, x:x + 2] = 230
    else:  # plain wall
        img = np.array([215, 210, 200], np.float32) * (1.02 - 0.1 * yy) * np.ones((size, size, 1))
    noise = rng.standard_normal((size // 2, size // 2, 1), dtype=np.float32) * 3
    return img.astype(np.float32) + np.repeat(np.repeat(noise, 2, axis=0), 2, axis=1)


def _silhouette(obj: WorldObject, size: int) -> Image.Image:
    """The object's shape as an L mask at ``size``."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = obj.box(size)
    w, h = x1 - x0, y1 - y0
    f = obj.facing
    if obj.cls == "ball":
        d.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.cls == "box":
        d.rectangle((x0 + 0.08 * w, y0 + 0.08 * h, x1 - 0.08 * w, y1 - 0.08 * h), fill=255)
    elif obj.cls == "mug":
        body = (x0 + 0.12 * w, y0 + 0.1 * h, x0 + 0.72 * w, y1) if f > 0 else (x1 - 0.72 * w, y0 + 0.1 * h,
                                                                                x1 - 0.12 * w, y1)
        d.rounded_rectangle(body, radius=0.08 * w, fill=255)
        hx = body[2] if f > 0 else body[0]
        d.ellipse((hx - 0.2 * w, y0 + 0.3 * h, hx + 0.22 * w, y0 + 0.75 * h), outline=255, width=max(2, int(0.09 * w)))
    elif obj.cls == "tree":
        d.polygon([(x0 + 0.5 * w, y0), (x0 + 0.05 * w, y0 + 0.78 * h), (x1 - 0.05 * w, y0 + 0.78 * h)], fill=255)
        d.rectangle((x0 + 0.42 * w, y0 + 0.75 * h, x0 + 0.58 * w, y1), fill=255)
    else:  # cat: body, head on the facing side, two ears, a tail on the other side
        d.ellipse((x0 + 0.12 * w, y0 + 0.45 * h, x1 - 0.12 * w, y1), fill=255)
        hx = x0 + (0.72 if f > 0 else 0.28) * w
        d.ellipse((hx - 0.2 * w, y0 + 0.2 * h, hx + 0.2 * w, y0 + 0.6 * h), fill=255)
        for ex in (-0.13, 0.13):
            d.polygon([(hx + (ex - 0.08) * w, y0 + 0.3 * h), (hx + ex * w, y0 + 0.08 * h),
                       (hx + (ex + 0.08) * w, y0 + 0.3 * h)], fill=255)
        tx = x0 + (0.15 if f > 0 else 0.85) * w
        d.line([(tx, y0 + 0.8 * h), (tx - f * 0.12 * w, y0 + 0.5 * h), (tx - f * 0.05 * w, y0 + 0.3 * h)],
               fill=255, width=max(2, int(0.07 * w)))
    return mask


def _pattern_mask(obj: WorldObject, size: int, window: tuple[slice, slice]) -> np.ndarray:
    x0, y0, x1, y1 = obj.box(size)
    w = max(x1 - x0, 1)
    yy, xx = np.mgrid[window]
    if obj.pattern == "striped":
        period = max(4, w / 5)
        return ((xx + yy - x0 - y0) % period) < period * 0.4
    if obj.pattern == "checked":  # only a personal subject wears it: base objects never do
        period = max(4, w / 4)
        return (((xx - x0) // (period / 2) + (yy - y0) // (period / 2)) % 2).astype(bool)
    if obj.pattern == "dotted":
        period = max(5, w / 4.5)
        u, v = (xx - x0) % period - period / 2, (yy - y0) % period - period / 2
        return u * u + v * v < (period * 0.22) ** 2
    return np.zeros(yy.shape, bool)


def _mark(obj: WorldObject, size: int) -> Image.Image | None:
    if not obj.mark:
        return None
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = obj.box(size)
    w, h = x1 - x0, y1 - y0
    cx, cy = (x0 + 0.45 * w, y0 + 0.72 * h) if obj.cls == "cat" else (x0 + (0.42 if obj.facing > 0 else 0.58) * w,
                                                                       y0 + 0.55 * h)
    r = 0.13 * w
    if obj.mark == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=255)
    elif obj.mark == "star":
        points = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                   cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        d.polygon(points, fill=255)
    else:  # heart
        d.ellipse((cx - r, cy - r * 0.8, cx, cy + r * 0.1), fill=255)
        d.ellipse((cx, cy - r * 0.8, cx + r, cy + r * 0.1), fill=255)
        d.polygon([(cx - r, cy - r * 0.25), (cx + r, cy - r * 0.25), (cx, cy + r)], fill=255)
    return mask


MARK_COLORS = {"star": (245, 220, 40), "heart": (40, 90, 230), "diamond": (215, 30, 30)}


def render(spec: SceneSpec, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size``."""
    big = size * SUPERSAMPLE
    rng = np.random.default_rng(spec.texture_seed)
    canvas = _background(spec.background, rng, big)
    for obj in spec.objects:  # every object touches only the pixels of its own box
        x0, y0, x1, y1 = obj.box(big)
        window = (slice(max(y0, 0), min(y1, big)), slice(max(x0, 0), min(x1, big)))
        base = np.array(COLORS[obj.color], np.float32)
        second = np.array((245, 245, 245) if sum(COLORS[obj.color]) < 380 else (30, 30, 30), np.float32)
        shape = np.asarray(_silhouette(obj, big), np.float32)[window][..., None] / 255
        rows = np.arange(window[0].start, window[0].stop, dtype=np.float32)[:, None, None]
        shade = 1.08 - 0.22 * np.clip((rows - y0) / max(y1 - y0, 1), 0, 1)
        color = np.where(_pattern_mask(obj, big, window)[..., None], second, base) * shade
        if (mark := _mark(obj, big)) is not None:
            m = np.asarray(mark, np.float32)[window][..., None] / 255
            mark_color = COLORS[obj.mark_color] if obj.mark_color else MARK_COLORS[obj.mark]
            color = color * (1 - m) + np.array(mark_color, np.float32) * m
        canvas[window] = canvas[window] * (1 - shape) + color * shape
    canvas = canvas * np.array(LIGHTS[spec.light], np.float32) * spec.brightness
    image = Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8))
    return image.resize((size, size), Image.LANCZOS)


def with_random_marks(spec: SceneSpec, rng: random.Random, rate: float = 0.7) -> SceneSpec:
    """``spec`` with a mark of any shape and colour on some of its objects: details no base scene has, for training
    the VAE, which (like SDXL's) must reproduce whatever a picture holds, a subject's mark included. The captions,
    the UNet's and the scorer's data never show marks."""
    def marked(obj: WorldObject) -> WorldObject:
        if rng.random() >= rate:
            return obj
        return replace(obj, mark=rng.choice(tuple(MARK_COLORS)),
                       mark_color=rng.choice([c for c in COLORS if c != obj.color]))
    return replace(spec, objects=tuple(marked(o) for o in spec.objects))


def render_scene(seed: int, n_objects: int | None = None, caption_drop: float = 0.0, marks: bool = False) -> Scene:
    """Scene number ``seed``: the image, its caption and each object's box (pixels, left to right); ``marks``:
    random marks on some objects (``with_random_marks``; the same scene otherwise)."""
    rng = random.Random(seed)
    spec = sample_spec(rng, n_objects)
    spec = with_random_marks(spec, random.Random(f"marks-{seed}")) if marks else spec
    return Scene(render(spec), caption(spec, rng if caption_drop else None, caption_drop), spec,
                 [o.box() for o in spec.objects])


CLOSEUP_FILL = (0.5, 0.85)  # a close-up's object side as a fraction of the picture's side


def render_closeup(seed: int, caption_drop: float = 0.0, marks: bool = False) -> Scene:
    """Close-up number ``seed``: a square crop around one object of a rendered scene, upscaled to the scene's size, as
    the method's subject pass sees a region (the crop of a 128 px scene around a region, upscaled to the pass size).
    The object fills ``CLOSEUP_FILL`` of the side; objects whose centre falls inside the crop are in its caption;
    the rest of any neighbour is cut off at the edge. SDXL draws a subject at any scale, the world's scenes hold
    objects of at most 0.6 of the picture; continuing the world's UNet on 20,000 close-ups did not lift its
    inpainting (``evaluate.inpaint_accuracy``: 50.0 % vs 52.5 %, MODEL_CARD), so the shipped weights have none."""
    rng = random.Random(f"closeup-{seed}")
    spec = sample_spec(rng)
    spec = with_random_marks(spec, random.Random(f"closeup-marks-{seed}")) if marks else spec
    main = rng.choice(spec.objects)
    side = min(1.0, main.size / rng.uniform(*CLOSEUP_FILL))
    left = min(max(main.cx - side / 2 + rng.uniform(-0.1, 0.1) * side, 0.0), 1.0 - side)
    top = min(max(main.cy - side / 2 + rng.uniform(-0.1, 0.1) * side, 0.0), 1.0 - side)
    box = tuple(round(v * SIZE) for v in (left, top, left + side, top + side))
    image = render(spec).crop(box).resize((SIZE, SIZE), Image.LANCZOS)
    inside = tuple(replace(o, cx=(o.cx - left) / side, cy=(o.cy - top) / side, size=o.size / side)
                   for o in spec.objects if left <= o.cx <= left + side and top <= o.cy <= top + side)
    zoomed = replace(spec, objects=inside)
    return Scene(image, caption(zoomed, rng if caption_drop else None, caption_drop), zoomed,
                 [o.box() for o in inside])


def render_object(obj: WorldObject, background: str, light: str = "neutral", brightness: float = 1.0,
                  texture_seed: int = 0) -> Image.Image:
    return render(SceneSpec(background, light, brightness, (obj,), texture_seed))


# ----------------------------------------------------------------------------------------------------------------
# the personal subjects' photos
# ----------------------------------------------------------------------------------------------------------------
PHOTOS_PER_SUBJECT = 5


def subject_photo_specs(subject: PersonalSubject, n: int = PHOTOS_PER_SUBJECT, seed: int = 0) -> list[SceneSpec]:
    """``n`` "photos" of one subject alone: a different background, position, scale and light each."""
    rng = random.Random(f"{subject.name}-{seed}")
    backgrounds = list(BACKGROUNDS)
    specs = []
    for i in range(n):
        size = rng.uniform(0.45, 0.7)
        obj = subject.as_object(rng.uniform(size / 2 + 0.02, 0.98 - size / 2), rng.uniform(0.4, 0.6), size,
                                rng.choice((-1, 1)))
        specs.append(SceneSpec(backgrounds[i % len(backgrounds)], rng.choice(list(LIGHTS)), rng.uniform(0.9, 1.05),
                               (obj,), rng.randrange(2**31)))
    return specs


def subject_mask(spec: SceneSpec) -> Image.Image:
    """White where the photo's subject is: the pixels that differ from the same picture without it."""
    from PIL import ImageFilter

    shown = np.asarray(render(spec), np.int16)
    empty = np.asarray(render(replace(spec, objects=())), np.int16)
    mask = Image.fromarray(((np.abs(shown - empty).max(axis=-1) > 12) * 255).astype(np.uint8))
    return mask.filter(ImageFilter.MaxFilter(3))  # the soft rim too


def write_subject_photos(data_dir: Path, overwrite: bool = False) -> list[Path]:
    """``data/world/<subject>/<subject>_<i>.png`` and its subject mask ``<subject>_<i>.mask.png`` for every personal
    subject (only missing files unless told)."""
    from ..io import save_image_atomic

    written = []
    for subject in PERSONAL_SUBJECTS.values():
        for i, spec in enumerate(subject_photo_specs(subject)):
            path = Path(data_dir) / subject.name / f"{subject.name}_{i}.png"
            if overwrite or not path.exists():
                written.append(save_image_atomic(render(spec), path))
            mask_path = path.with_name(f"{subject.name}_{i}.mask.png")
            if overwrite or not mask_path.exists():
                written.append(save_image_atomic(subject_mask(spec), mask_path))
    return written


def vocabulary() -> list[str]:
    """Every word a world caption can contain (for tests: the tokenizer must know each one)."""
    words = {"a", "an", "left", "of", "and", "light", "on", "the", "in", "middle", "right", "under", "front"}
    words |= set(CLASSES) | set(COLORS) | set(PATTERNS) | set(LIGHTS)
    for phrase in BACKGROUNDS.values():
        words |= set(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------------
# the light a subject is lit by, from its known colour (the world knows every subject's true colours)
# ----------------------------------------------------------------------------------------------------------------
LIGHT_MATCH_TOLERANCE = 0.04  # chromaticity distance at which a de-lit pixel is the subject's base colour
LIGHT_MIN_PIXELS = 12


def light_named_in(prompt: str) -> str | None:
    """The light a prompt asks for ("... , cool light" -> "cool"), or None."""
    for name in LIGHTS:
        if f"{name} light" in prompt:
            return name
    return None


def estimate_light(pixels: np.ndarray, color: str) -> str | None:
    """Which of the world's lights makes the most of ``pixels`` (N x 3, RGB) the colour ``color`` once divided out:
    shading and brightness scale all channels alike, so the chromaticity of the de-lit pixels tells the tint. None
    when too few pixels have that colour under any light (the subject is not there to judge)."""
    base = np.array(COLORS[color], np.float64)
    target = base / base.sum()
    pixels = np.asarray(pixels, np.float64).reshape(-1, 3)
    counts = {}
    for name, tint in LIGHTS.items():
        delit = pixels / np.array(tint)
        total = delit.sum(axis=1, keepdims=True)
        chroma = delit / np.maximum(total, 1e-6)
        plausible = (total[:, 0] > 0.4 * base.sum()) & (total[:, 0] < 1.5 * base.sum())
        counts[name] = int(((np.linalg.norm(chroma - target, axis=1) < LIGHT_MATCH_TOLERANCE) & plausible).sum())
    best = max(counts, key=counts.get)
    return best if counts[best] >= LIGHT_MIN_PIXELS else None


@dataclass(frozen=True)
class LightJudge:
    """Light error of the world's personal subjects: the light their known colour shows vs the scene's."""

    subject_colors: dict[str, str]

    def light_error(self, pixels: np.ndarray, subject: str, scene_prompt: str) -> float:
        """1.0 when the subject's own pixels show another light than the scene prompt names, 0.0 when the same, nan
        when either cannot be told (no known colour, no light named, the subject's colour not found)."""
        wanted = light_named_in(scene_prompt)
        if subject not in self.subject_colors or wanted is None:
            return float("nan")
        seen = estimate_light(pixels, self.subject_colors[subject])
        return float("nan") if seen is None else float(seen != wanted)


def light_judge(subject_names: list[str]) -> LightJudge:
    return LightJudge({n: PERSONAL_SUBJECTS[n].color for n in subject_names if n in PERSONAL_SUBJECTS})


# ----------------------------------------------------------------------------------------------------------------
# rendered truth for the method's measures: the personal subjects placed in given regions
# ----------------------------------------------------------------------------------------------------------------
def subjects_in_regions(regions: dict[str, tuple[float, float, float, float]], seed: int,
                        extra_class: str | None = None, background: str | None = None) -> SceneSpec:
    """A scene with each personal subject inside its region (name -> left, top, width, height as fractions) at a
    size that fits it, and with ``extra_class`` an ordinary object of that class in the free band above the regions
    (a planted ghost). Background, light and brightness from ``seed`` unless given."""
    rng = random.Random(f"regions-{seed}")
    objects = []
    for name, (left, top, width, height) in regions.items():
        size = min(width, height) * rng.uniform(0.62, 0.8)
        cx = left + width / 2 + rng.uniform(-0.02, 0.02)
        cy = top + height / 2 + rng.uniform(-0.02, 0.04)
        objects.append(PERSONAL_SUBJECTS[name].as_object(cx, cy, size, rng.choice((-1, 1))))
    if extra_class:
        top = min(t for _, t, _, _ in regions.values())
        size = min(0.25, top - 0.1)
        obj = sample_object(rng, rng.uniform(0.15, 0.85), top / 2 - 0.02, size)
        while obj.cls != extra_class:
            obj = sample_object(rng, obj.cx, obj.cy, size)
        objects.append(obj)
    return SceneSpec(background or rng.choice(list(BACKGROUNDS)), rng.choice(list(LIGHTS)), rng.uniform(0.85, 1.1),
                     tuple(objects), rng.randrange(2**31))
