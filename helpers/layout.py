"""Where each subject goes: regions in normalized coordinates, validation, feathered masks, JSON io.

No model and no ipywidgets here (``designer`` builds the UI on top of this module).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .io import write_text_atomic

SCHEMA_VERSION = 1
SHAPES = ("box", "ellipse")
MIN_REGION_SIZE = 0.08  # fraction of the canvas side: smaller regions are too few latent pixels to hold a subject
MAX_OVERLAP = 0.05  # fraction of the smaller region that may be shared with another
LAYOUT_FILE = "layout.json"
SUBJECT_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]  # one per region, in order


class LayoutError(ValueError):
    """A layout that cannot be used; the message names the subject(s), key or file."""


@dataclass
class Region:
    """One subject's place: top-left (x, y) and size (w, h), all as fractions of the canvas width/height."""

    subject: str
    x: float
    y: float
    w: float
    h: float
    shape: str = "ellipse"

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def pixel_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels, right/bottom exclusive."""
        left, top = round(self.x * width), round(self.y * height)
        return left, top, max(left + 1, round((self.x + self.w) * width)), max(top + 1, round((self.y + self.h) * height))


@dataclass
class Layout:
    regions: list[Region]
    width: int = 1024
    height: int = 1024
    version: int = SCHEMA_VERSION

    def region(self, subject: str) -> Region:
        for r in self.regions:
            if r.subject == subject:
                return r
        raise LayoutError(f"the layout has no region for subject {subject!r}")

    @property
    def subjects(self) -> list[str]:
        return [r.subject for r in self.regions]

    def to_dict(self) -> dict:
        return {"version": self.version, "width": self.width, "height": self.height,
                "regions": [asdict(r) for r in self.regions]}

    @classmethod
    def from_dict(cls, data: dict, source: str = "layout") -> Layout:
        def need(mapping: dict, key: str, where: str):
            if key not in mapping:
                raise LayoutError(f"{source}: missing key {key!r} in {where}")
            return mapping[key]

        if not isinstance(data, dict):
            raise LayoutError(f"{source}: expected a JSON object with 'regions', got {type(data).__name__}")
        version = need(data, "version", "the top level")
        if version != SCHEMA_VERSION:
            raise LayoutError(f"{source}: schema version {version} is not supported (expected {SCHEMA_VERSION})")
        regions = []
        for i, raw in enumerate(need(data, "regions", "the top level")):
            where = f"regions[{i}]"
            try:
                regions.append(Region(subject=str(need(raw, "subject", where)),
                                      **{k: float(need(raw, k, where)) for k in ("x", "y", "w", "h")},
                                      shape=str(raw.get("shape", "ellipse"))))
            except (TypeError, ValueError, AttributeError) as e:
                if isinstance(e, LayoutError):
                    raise
                raise LayoutError(f"{source}: {where} is malformed ({e})") from None
        return cls(regions, int(need(data, "width", "the top level")), int(need(data, "height", "the top level")))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Layout:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LayoutError(f"{path}: no such layout file; run notebooks/02_layout_designer.ipynb first") from None
        except json.JSONDecodeError as e:
            raise LayoutError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or delete it") from None
        except UnicodeDecodeError:
            raise LayoutError(f"{path}: not a text file (layout files are JSON); fix or delete it") from None
        return cls.from_dict(data, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------------------------
def region_mask(region: Region, width: int, height: int) -> np.ndarray:
    """Boolean hard mask of one region (the ellipse inscribed in its box, or the box)."""
    left, top, right, bottom = region.pixel_box(width, height)
    mask = np.zeros((height, width), dtype=bool)
    if region.shape == "box":
        mask[max(top, 0):bottom, max(left, 0):right] = True
        return mask
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = (left + right) / 2, (top + bottom) / 2
    rx, ry = max((right - left) / 2, 0.5), max((bottom - top) / 2, 0.5)
    return ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0


@dataclass
class MaskSet:
    """Per-subject masks at one image size.

    ``soft``: float32 in [0, 1], 1 on the hard core, fading to 0 at the region's edge (feathered inward, so nothing
    outside the region is ever blended). ``support``: soft > 0. ``core``: soft == 1, disjoint between subjects.
    ``dilated``: support grown by the feather width, the zone outside which an image must equal the coarse scene.
    """

    width: int
    height: int
    feather: int
    soft: dict[str, np.ndarray] = field(default_factory=dict)
    support: dict[str, np.ndarray] = field(default_factory=dict)
    core: dict[str, np.ndarray] = field(default_factory=dict)
    dilated: dict[str, np.ndarray] = field(default_factory=dict)
    _boxes: dict[tuple[str, float], tuple[int, int, int, int]] = field(default_factory=dict, repr=False,
                                                                         compare=False)

    @property
    def union_dilated(self) -> np.ndarray:
        return np.logical_or.reduce(list(self.dilated.values()))

    def areas(self) -> dict[str, float]:
        """Fraction of the image each subject's support covers."""
        return {name: float(m.mean()) for name, m in self.support.items()}

    def crop_box(self, subject: str, margin: float) -> tuple[int, int, int, int]:
        """A square box around the subject's mask plus ``margin`` of its size: a subject pass sees some context, and
        a scorer sees the region the way the pass painted it. Kept per (subject, margin): a batch of passes asks
        for every member's box several times, each a scan of the whole support (~5 ms at 1024 px)."""
        key = (subject, margin)
        if key not in self._boxes:
            self._boxes[key] = self._crop_box(subject, margin)
        return self._boxes[key]

    def _crop_box(self, subject: str, margin: float) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.support[subject])
        left, right, top, bottom = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        side = int(round(max(right - left, bottom - top) * (1 + 2 * margin)))
        side = max(8, min(side, self.width, self.height))
        cx, cy = (left + right) / 2, (top + bottom) / 2
        x0 = int(np.clip(round(cx - side / 2), 0, self.width - side))
        y0 = int(np.clip(round(cy - side / 2), 0, self.height - side))
        return x0, y0, x0 + side, y0 + side


def masks(layout: Layout, width: int, height: int, feather: int = 4) -> MaskSet:
    """Feathered masks for every region; where two regions overlap, each pixel goes to the nearer region centre.
    Computed once per layout and size (the distance transforms cost ~0.25 s at 1024 px, every coarse-to-fine run
    and QA round asked again); the arrays are read-only, so a cached set cannot be changed by a caller."""
    return _masks_cached(json.dumps(layout.to_dict(), sort_keys=True), width, height, feather)


@lru_cache(maxsize=16)
def _masks_cached(layout_json: str, width: int, height: int, feather: int) -> MaskSet:
    layout = Layout.from_dict(json.loads(layout_json))
    out = _compute_masks(layout, width, height, feather)
    for group in (out.soft, out.support, out.core, out.dilated):
        for array in group.values():
            array.setflags(write=False)
    return out


def _compute_masks(layout: Layout, width: int, height: int, feather: int) -> MaskSet:
    hard = {r.subject: region_mask(r, width, height) for r in layout.regions}
    names = list(hard)
    if len(names) > 1:  # give shared pixels to one owner so hard cores never overlap
        yy, xx = np.mgrid[0:height, 0:width]
        dist = np.stack([np.hypot((xx + 0.5) / width - layout.region(n).center[0],
                                  (yy + 0.5) / height - layout.region(n).center[1]) for n in names])
        stacked = np.stack([hard[n] for n in names])
        owner = np.where(stacked, dist, np.inf).argmin(axis=0)
        hard = {n: hard[n] & (owner == i) for i, n in enumerate(names)}
    out = MaskSet(width, height, feather)
    for name, mask in hard.items():
        inside = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        soft = np.clip(inside / max(feather, 1), 0.0, 1.0).astype(np.float32) if feather > 0 else \
            mask.astype(np.float32)
        out.soft[name] = soft
        out.support[name] = soft > 0
        out.core[name] = soft >= 1.0
        # every pixel within ``feather`` of the support (a Euclidean distance transform: one pass, where iterating a
        # 3x3 dilation ``feather`` times cost ~0.2 s per subject at 1024 px)
        out.dilated[name] = ndimage.distance_transform_edt(~out.support[name]) <= max(feather, 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def overlap_fraction(a: Region, b: Region, size: int = 256) -> float:
    """Shared area as a fraction of the smaller region, measured on a raster."""
    ma, mb = region_mask(a, size, size), region_mask(b, size, size)
    smaller = min(ma.sum(), mb.sum())
    return float((ma & mb).sum() / smaller) if smaller else 0.0


def gap_between(a: Region, b: Region, size: int = 256) -> float:
    """Shortest distance between two regions as a fraction of the canvas side (0 when they touch)."""
    ma, mb = region_mask(a, size, size), region_mask(b, size, size)
    if (ma & mb).any():
        return 0.0
    return float(ndimage.distance_transform_edt(~ma)[mb].min() / size)


def validate_layout(layout: Layout, subject_names: list[str], max_overlap: float = MAX_OVERLAP,
                    min_gap: float = 0.0, min_size: float = MIN_REGION_SIZE) -> None:
    """Raise ``LayoutError`` naming the subject(s) at the first problem found."""
    names = layout.subjects
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LayoutError(f"more than one region for subject(s) {', '.join(dupes)}")
    missing = [n for n in subject_names if n not in names]
    extra = [n for n in names if n not in subject_names]
    if missing or extra:
        parts = ([f"no region for {', '.join(missing)}"] if missing else []) + \
                ([f"regions for unknown subject(s) {', '.join(extra)}"] if extra else [])
        raise LayoutError(f"layout and config disagree: {'; '.join(parts)} (configured: {', '.join(subject_names)})")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layout.width, layout.height)) \
            or layout.width <= 0 or layout.height <= 0:
        raise LayoutError(f"canvas size must be positive, got {layout.width}x{layout.height}")
    eps = 1e-6
    for r in layout.regions:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (r.x, r.y, r.w, r.h)):
            raise LayoutError(f"subject {r.subject!r}: x, y, w and h must be numbers, got "
                              f"{', '.join(repr(v) for v in (r.x, r.y, r.w, r.h))}")
        if r.shape not in SHAPES:
            raise LayoutError(f"subject {r.subject!r}: unknown shape {r.shape!r} (use {' or '.join(SHAPES)})")
        if not all(math.isfinite(v) for v in (r.x, r.y, r.w, r.h)):
            raise LayoutError(f"subject {r.subject!r}: coordinates must be finite numbers")
        if r.w < min_size or r.h < min_size:
            raise LayoutError(f"subject {r.subject!r}: region {r.w:.2f}x{r.h:.2f} is smaller than the minimum "
                              f"{min_size:.2f} of the canvas side")
        if r.x < -eps or r.y < -eps or r.x + r.w > 1 + eps or r.y + r.h > 1 + eps:
            raise LayoutError(f"subject {r.subject!r}: region leaves the canvas (x={r.x:.2f}, y={r.y:.2f}, "
                              f"w={r.w:.2f}, h={r.h:.2f}; x+w and y+h must be <= 1)")
    for i, a in enumerate(layout.regions):
        for b in layout.regions[i + 1:]:
            overlap = overlap_fraction(a, b)
            if overlap > max_overlap:
                raise LayoutError(f"subjects {a.subject!r} and {b.subject!r} overlap by {overlap:.0%} of the smaller "
                                  f"region (at most {max_overlap:.0%} allowed): move them apart")
            if min_gap > 0 and (gap := gap_between(a, b)) < min_gap:
                raise LayoutError(f"subjects {a.subject!r} and {b.subject!r} are {gap:.3f} apart, closer than the "
                                  f"minimum gap {min_gap:.3f}")


def default_layout(subject_names: list[str], width: int = 1024, height: int = 1024) -> Layout:
    """Side by side for two subjects, a grid beyond; always valid and non-overlapping (1-6 subjects)."""
    n = len(subject_names)
    if not 1 <= n <= 6:
        raise LayoutError(f"default_layout handles 1-6 subjects, got {n}; place the regions yourself")
    if n == 1:
        return Layout([Region(subject_names[0], 0.25, 0.2, 0.5, 0.6)], width, height)
    cols = n if n <= 3 else math.ceil(n / 2)
    rows = math.ceil(n / cols)
    margin, gap = 0.04, 0.04
    cell_w, cell_h = (1 - 2 * margin - (cols - 1) * gap) / cols, (1 - 2 * margin - (rows - 1) * gap) / rows
    region_h = min(cell_h, 0.6) if rows == 1 else cell_h
    top0 = 1 - margin - region_h if rows == 1 else margin  # one row sits low, as objects on a table do
    regions = []
    for i, name in enumerate(subject_names):
        row, col = divmod(i, cols)
        regions.append(Region(name, round(margin + col * (cell_w + gap), 4), round(top0 + row * (cell_h + gap), 4),
                              round(cell_w, 4), round(region_h, 4)))
    return Layout(regions, width, height)


def load_or_default_layout(path: Path, subject_names: list[str], width: int, height: int) -> tuple[Layout, str]:
    """The saved layout when there is one (validated against the subjects), else the default; says which."""
    if path.exists():
        layout = Layout.load(path)
        try:
            validate_layout(layout, subject_names)
        except LayoutError as e:
            raise LayoutError(f"{path}: {e}") from None
        return layout, f"loaded {path}"
    layout = default_layout(subject_names, width, height)
    return layout, f"no saved layout at {path}: using the default layout (run notebook 02 to design one)"


def layout_to_repair(path: Path, subject_names: list[str], width: int, height: int) -> tuple[Layout, str]:
    """What the designer opens with: the saved layout even when it breaks a rule (the designer shows the problem and
    lets you fix it); the default when the file cannot be read at all or names other subjects. The file itself is
    only replaced when you save."""
    default = default_layout(subject_names, width, height)
    if not path.exists():
        return default, f"no saved layout at {path}: using the default layout (run notebook 02 to design one)"
    try:
        layout = Layout.load(path)
    except LayoutError as e:
        return default, f"{e}; starting from the default layout. Saving replaces the file."
    try:
        validate_layout(layout, subject_names)
        return layout, f"loaded {path}"
    except LayoutError as e:
        problem = f"{path}: {e}"
    if sorted(layout.subjects) == sorted(subject_names) and all(r.shape in SHAPES for r in layout.regions) and all(
            math.isfinite(v) for r in layout.regions for v in (r.x, r.y, r.w, r.h)):
        return layout, f"{problem}. Fix it below and save."
    return default, f"{problem}; starting from the default layout. Saving replaces the file."
