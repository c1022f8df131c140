"""Subject photos: loading with clear errors, EXIF orientation, RGB conversion, size checks, augmentation, demo data."""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ProjectConfig, Subject
from .io import atomic_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# an optional mask beside a photo ("cat_0.png" -> "cat_0.mask.png", white where the subject is): training then weights
# the loss towards the subject's own pixels (config.mask_background_weight)
MASK_SUFFIX = ".mask.png"
MIN_PHOTOS_ADVISED = 3


class SubjectDataError(ValueError):
    """A subject's photos cannot be used; the message names the file or folder and what to do."""


def photo_inventory(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The photos training will read, and every other entry of the folder with the reason it is not used."""
    used, ignored = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # hidden files: editor and OS leftovers (.DS_Store, .ipynb_checkpoints), never photos
        if p.name.lower().endswith(MASK_SUFFIX):
            continue  # a photo's subject mask, read with its photo (photo_mask_path)
        if p.is_dir():
            ignored.append((p, "a folder (photos in subfolders are not read; move them up)"))
        elif p.suffix.lower() not in IMAGE_SUFFIXES:
            ignored.append((p, f"extension {p.suffix or '(none)'!r} is not one of {', '.join(sorted(IMAGE_SUFFIXES))}"))
        else:
            used.append(p)
    return used, ignored


def subject_photo_paths(folder: Path, subject_name: str) -> list[Path]:
    if not folder.is_dir():
        raise SubjectDataError(f"subject {subject_name!r}: photo folder {folder} does not exist. Create it and put "
                               f"3-20 photos of the subject in it.")
    paths, ignored = photo_inventory(folder)
    if not paths:
        raise SubjectDataError(f"subject {subject_name!r}: photo folder {folder} has no images "
                               f"({', '.join(sorted(IMAGE_SUFFIXES))}). Add 3-20 photos of the subject.")
    return paths


def ignored_files_note(folder: Path, subject_name: str) -> str | None:
    """One line naming every file of the subject's folder that training will not read, and why (None if all used)."""
    if not folder.is_dir():
        return None
    _, ignored = photo_inventory(folder)
    if not ignored:
        return None
    return f"subject {subject_name!r}: not used: " + "; ".join(f"{p.name} ({why})" for p, why in ignored)


# Below this spread of pixel values (0-255 scale, after conversion to RGB) a photo is one flat colour: nothing to
# learn, and often a sign that the file decoded wrongly.
MIN_PIXEL_STD = 4.0


MAX_PHOTO_SIDE = 4096  # a photo between PIL's warning and error pixel limits is downscaled to this long side


def load_photo(path: Path, min_size: int) -> Image.Image:
    """One photo as upright RGB; rejects unreadable files, photos smaller than ``min_size`` on their short side, and
    photos that are blank or too uniform to teach anything."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                original = im.size
                very_large = any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)
                if very_large:  # between PIL's warning and error limits: read at a sane size
                    im.draft("RGB", (im.width // 4, im.height // 4))  # JPEG: decodes at a lower scale directly
                    im.load()
                    im.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE), Image.LANCZOS)
                im.load()
                image = ImageOps.exif_transpose(im)  # phones store portrait shots sideways plus an EXIF flag
        if very_large:
            warnings.warn(f"{path}: a very large photo ({original[0]}x{original[1]} px); downscaled to at most "
                          f"{MAX_PHOTO_SIDE} px on its long side", stacklevel=2)
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = found.group(1) if found else "too many"
        raise SubjectDataError(f"{path}: the photo is too large to open safely ({pixels} pixels, over PIL's limit of "
                               f"{2 * Image.MAX_IMAGE_PIXELS} that guards against decompression bombs). Downscale it "
                               f"(a few thousand pixels on its long side is plenty) or remove it.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SubjectDataError(f"{path}: cannot read this image ({type(e).__name__}: {e}). Replace or remove it.") \
            from None
    image = _to_rgb(image)
    if min(image.size) < min_size:
        raise SubjectDataError(f"{path}: {image.width}x{image.height} px is too small; the short side needs at least "
                               f"{min_size} px. Use a larger photo.")
    spread = float(np.asarray(image.resize((64, 64)), dtype=np.float32).reshape(-1, 3).std(axis=0).max())
    if spread < MIN_PIXEL_STD:
        raise SubjectDataError(f"{path}: the photo is blank or one flat colour (pixel spread {spread:.1f} < "
                               f"{MIN_PIXEL_STD}): nothing to learn from it. Replace or remove it.")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float: PIL's convert("RGB") clips to white
        values = np.asarray(image, dtype=np.float64)
        full_scale = 65535.0 if image.mode != "F" or values.max() > 1.0 else 1.0
        return Image.fromarray(np.clip(values / full_scale * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, not black
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # CMYK, L, I;16, P, YCbCr ...


def load_subject_photos(config: ProjectConfig, subject: Subject, min_size: int | None = None) -> list[Image.Image]:
    """All usable photos of ``subject``; warns when there are fewer than three (identity will be weak)."""
    min_size = min_size if min_size is not None else min(config.train_resolution, 256)
    paths = subject_photo_paths(config.data_path(subject), subject.name)
    photos = [load_photo(p, min_size) for p in paths]
    if note := ignored_files_note(config.data_path(subject), subject.name):
        warnings.warn(note)
    if len(photos) < MIN_PHOTOS_ADVISED:
        warnings.warn(f"subject {subject.name!r} has only {len(photos)} photo(s); 3-20 varied photos give a LoRA "
                      f"that keeps the identity without copying one picture.")
    return photos


def add_photos(config: ProjectConfig, subject: Subject, files: list[tuple[str, bytes]]) -> list[Path]:
    """Put uploaded photos (name, bytes) into the subject's folder, each checked as training will read it; a photo
    that cannot be used raises ``SubjectDataError`` naming it and nothing of it is written. Files are named by their
    content, so the same photo uploaded twice is stored once."""
    import hashlib
    import tempfile

    folder = config.data_path(subject)
    checked = []
    for name, content in files:
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise SubjectDataError(f"{name}: not a photo this project reads ({', '.join(sorted(IMAGE_SUFFIXES))})")
        with tempfile.TemporaryDirectory() as tmp:  # validate exactly as training will read it
            probe = Path(tmp) / Path(name).name
            probe.write_bytes(content)
            try:
                load_photo(probe, min(config.train_resolution, 256))
            except SubjectDataError as e:
                raise SubjectDataError(f"upload {name!r} for {subject.name!r}: {str(e).split(': ', 1)[1]}") from None
        checked.append((f"{subject.name}_{hashlib.sha256(content).hexdigest()[:12]}{suffix}", content))
    written = []
    for filename, content in checked:
        target = folder / filename
        if not target.exists():
            with atomic_path(target) as tmp:
                tmp.write_bytes(content)
        written.append(target)
    return written


def add_photo_files(config: ProjectConfig, photos: dict[str, list[str]] | None) -> dict[str, int]:
    """``{"toy": ["/content/toy1.jpg", ...]}`` (a notebook parameter) into each subject's folder via ``add_photos``;
    returns how many photos each subject's folder then holds."""
    for name, paths in (photos or {}).items():
        add_photos(config, config.subject(name), [(Path(p).name, Path(p).read_bytes()) for p in paths])
    return {s.name: len(subject_photo_paths(config.data_path(s), s.name)) if config.data_path(s).is_dir() else 0
            for s in config.subjects}


def upload_widget(config: ProjectConfig):
    """One ``FileUpload`` per subject (ipywidgets 7.7 and 8); each upload goes through ``add_photos``."""
    import ipywidgets as w

    rows = []
    for subject in config.subjects:
        upload = w.FileUpload(accept="image/*", multiple=True, description=f"{subject.name} photos")
        status = w.HTML()

        def on_upload(change, subject=subject, status=status):
            value = change["new"]
            items = value.values() if isinstance(value, dict) else value  # 7.7: {name: {...}}, 8: ({...}, ...)
            files = [(item.get("name") or item.get("metadata", {}).get("name", "photo.jpg"), bytes(item["content"]))
                     for item in items]
            try:
                written = add_photos(config, subject, files)
                status.value = f"&#10003; {len(written)} photo(s) in {config.data_path(subject)}"
            except SubjectDataError as e:
                status.value = f"<span style='color:#b00020'>{e}</span>"

        upload.observe(on_upload, names="value")
        rows.append(w.HBox([upload, status]))
    return w.VBox(rows)


def photo_summary(config: ProjectConfig, subject: Subject) -> str:
    """One line: how many usable photos the subject has and the smallest side, or where to put them."""
    folder = config.data_path(subject)
    if not folder.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
        return f"{subject.name}: no photos yet in {folder}; add 3-20 in notebook 01 (parameter `photos` or upload)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note below says the same in one line
        photos = load_subject_photos(config, subject)
    line = f"{subject.name}: {len(photos)} photos, smallest side {min(min(p.size) for p in photos)} px"
    note = ignored_files_note(folder, subject.name)
    return f"{line}; {note.split(': ', 1)[1]}" if note else line


def augment(image: Image.Image, size: int, rng: random.Random, flip: bool = True) -> Image.Image:
    """Random square crop (80-100 % of the short side) and, with ``flip``, a horizontal flip half of the time,
    resized to ``size``."""
    return augment_with_mask(image, None, size, rng, flip)[0]


def augment_with_mask(image: Image.Image, mask: Image.Image | None, size: int, rng: random.Random,
                      flip: bool = True) -> tuple[Image.Image, Image.Image | None]:
    """``augment``, with the same crop and flip applied to the photo's mask (if any). The coin for the flip is
    drawn either way, so the crops do not depend on ``flip``."""
    short = min(image.size)
    crop = int(short * rng.uniform(0.8, 1.0))
    left = rng.randint(0, image.width - crop)
    top = rng.randint(0, image.height - crop)
    flip = rng.random() < 0.5 and flip

    def view(picture: Image.Image) -> Image.Image:
        out = picture.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out

    return view(image), view(mask) if mask is not None else None


def photo_mask_path(photo: Path) -> Path:
    return photo.with_name(photo.stem + MASK_SUFFIX)


def mask_paths(photos: list[Path]) -> list[Path] | None:
    """Each photo's mask file, or None unless every photo has one (a subject's photos are masked all or none)."""
    masks = [photo_mask_path(p) for p in photos]
    return masks if all(m.exists() for m in masks) else None


def load_subject_masks(config: ProjectConfig, subject: Subject) -> list[Image.Image] | None:
    """The subject masks of its photos (grey, photo-sized, in ``subject_photo_paths`` order), or None unless every
    photo has one; a mask whose size differs from its photo's is a ``SubjectDataError``."""
    paths = subject_photo_paths(config.data_path(subject), subject.name)
    if mask_paths(paths) is None:
        return None
    masks = []
    for path in paths:
        with Image.open(photo_mask_path(path)) as im:
            mask = im.convert("L")
        with Image.open(path) as photo:
            size = ImageOps.exif_transpose(photo).size
        if mask.size != size:
            raise SubjectDataError(f"{photo_mask_path(path)}: the mask is {mask.width}x{mask.height} px, its photo "
                                   f"{size[0]}x{size[1]}; make it the photo's size or remove it.")
        masks.append(mask)
    return masks


def center_square(image: Image.Image, size: int) -> Image.Image:
    return ImageOps.fit(image, (size, size), Image.BICUBIC)


# ----------------------------------------------------------------------------------------------------------------
# demo subjects from scikit-image's bundled photos
# ----------------------------------------------------------------------------------------------------------------
# (left, top, right, bottom) as fractions of the photo, and whether to mirror: several distinct views per subject.
DEMO_VIEWS = {
    "cat": ("chelsea", [((0.10, 0.00, 0.85, 1.00), False), ((0.20, 0.05, 0.80, 0.95), True),
                        ((0.05, 0.00, 0.75, 1.00), False), ((0.25, 0.00, 0.95, 1.00), True)]),
    "mug": ("coffee", [((0.05, 0.00, 0.80, 1.00), False), ((0.15, 0.05, 0.85, 0.95), True),
                       ((0.00, 0.00, 0.70, 0.95), True), ((0.20, 0.00, 0.95, 1.00), False)]),
}


def ensure_demo_photos(config: ProjectConfig) -> list[Path]:
    """Write whatever demo photos the configured subjects' folders are missing: the scikit-image cat and mug under
    ``data/``, the rendered world subjects under ``data/world/``. Folders of your own subjects are left alone."""
    from . import world

    folders = {config.data_path(s).resolve() for s in config.subjects}
    written = []
    if folders & {config.path(f"data/{name}").resolve() for name in DEMO_VIEWS}:
        written += make_demo_subjects(config.path("data"))
    if folders & {config.path(f"data/world/{name}").resolve() for name in world.PERSONAL_SUBJECTS}:
        written += world.write_subject_photos(config.path("data/world"))
    return written


def make_demo_subjects(data_dir: Path, size: int = 256, overwrite: bool = False) -> list[Path]:
    """Write the demo cat and mug photos (crops/flips of scikit-image's chelsea.png and coffee.png)."""
    import skimage.data

    written = []
    for name, (photo, views) in DEMO_VIEWS.items():
        source = Image.fromarray(np.asarray(getattr(skimage.data, photo)()))
        folder = Path(data_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (box, mirror) in enumerate(views):
            target = folder / f"{name}_{i}.jpg"
            if target.exists() and not overwrite:
                continue
            w, h = source.size
            view = source.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
            view = center_square(view, size)
            if mirror:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            with atomic_path(target) as tmp:
                view.save(tmp, format="JPEG", quality=92)
            written.append(target)
    return written
