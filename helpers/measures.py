"""Where each claim of the method is measured: a subject on its own pixels, the object located inside a region, and
the judgements the report makes of a picture (class presence, ghost objects, split-world).

A region's crop box holds much of its neighbour, so nothing here scores a box: a subject's *own pixels* are its mask's
support minus every other subject's support, and everything else in its crop is painted with the scene's background
colour (the median of the picture's border outside all regions). Objects are located as the connected areas that
differ from that colour (a region's one object: the box around all of them), then named by the scorer among a class
vocabulary (zero-shot: "a cat", "a mug", ...).
One code path for every profile; ``tests/test_measures.py`` checks each judgement on rendered scenes whose truth is
known. The light of a region needs its subject's true colours, which only the world knows (``world.LightJudge``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .config import ProjectConfig
from .layout import MaskSet

BORDER_PX = 4  # the picture's outer rows and columns that tell its background colour
DIFFERS = 40.0  # RGB distance from the background colour at which a pixel belongs to an object
OBJECT_MIN_FRACTION = 30 / 128**2  # the smallest object worth naming, as a fraction of the picture
GHOST_MIN_FRACTION = 60 / 128**2  # a ghost must be a visible object, not a leftover edge of one
GHOST_DIFFERS = 20.0  # against each row's own background colour, which follows gradients
SPLIT_WORLD_DISTANCE = 30.0  # RGB distance within which a pixel shows the scene's background colour
# below this share of the scene's background along its inner edge a region is a split world: the midpoint of the gap
# on rendered truth (a subject as large as its region leaves >= 0.30; another background inside it <= 0.19)
SPLIT_WORLD_MIN_SHARE = 0.25


# ----------------------------------------------------------------------------------------------------------------
# a subject's own pixels
# ----------------------------------------------------------------------------------------------------------------
def own_pixels(masks_: MaskSet, subject: str) -> np.ndarray:
    """The subject's support minus every other subject's support: pixels that can only show this subject."""
    own = masks_.support[subject].copy()
    for name, support in masks_.support.items():
        if name != subject:
            own &= ~support
    return own


def background_color(pixels: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Median colour of the picture's border (``BORDER_PX`` wide), leaving out ``exclude``d pixels when any remain."""
    border = np.zeros(pixels.shape[:2], bool)
    border[:BORDER_PX], border[-BORDER_PX:], border[:, :BORDER_PX], border[:, -BORDER_PX:] = True, True, True, True
    keep = border & ~exclude if exclude is not None and (border & ~exclude).any() else border
    return np.median(pixels[keep].reshape(-1, pixels.shape[-1]), axis=0)


def own_crop(image: Image.Image, masks_: MaskSet, subject: str) -> Image.Image:
    """The bounding box of the subject's own pixels, every other pixel in it painted with the scene's background."""
    own = own_pixels(masks_, subject)
    pixels = np.array(image.convert("RGB"))
    fill = background_color(pixels, masks_.union_dilated).astype(np.uint8)
    pixels[~own] = fill
    ys, xs = np.nonzero(own)
    return Image.fromarray(pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


def own_crops(image: Image.Image, masks_: MaskSet, names: list[str]) -> dict[str, Image.Image]:
    return {n: own_crop(image, masks_, n) for n in names}


# ----------------------------------------------------------------------------------------------------------------
# locating and naming objects
# ----------------------------------------------------------------------------------------------------------------
def background_rows(pixels: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """The background colour of every row (H x 1 x 3): the median of the row's pixels outside ``exclude``, smoothed
    over neighbouring rows; backgrounds change from top to bottom (a horizon, a table's far edge, light falloff)
    far more than across. Rows with nothing to measure take the border colour."""
    height = pixels.shape[0]
    keep = ~exclude if exclude is not None else np.ones(pixels.shape[:2], bool)
    fallback = background_color(pixels, exclude)
    rows = np.array([np.median(pixels[y][keep[y]], axis=0) if keep[y].sum() >= 4 else fallback
                     for y in range(height)], np.float32)
    window = max(3, height // 16) | 1
    rows = ndimage.median_filter(rows, size=(window, 1), mode="nearest")
    return rows[:, None, :]


def locate_objects(image: Image.Image, min_fraction: float = OBJECT_MIN_FRACTION, threshold: float = DIFFERS,
                   exclude: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
    """Boxes of the areas that differ from the background, largest first. The background is the border colour, or,
    with ``exclude`` (pixels that are no object to find, e.g. the regions), each row's colour outside ``exclude``."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    background = background_color(pixels) if exclude is None else background_rows(pixels, exclude)
    differs = np.linalg.norm(pixels - background, axis=-1) > threshold
    if exclude is not None:
        differs &= ~exclude
    labels, count = ndimage.label(ndimage.binary_opening(differs, iterations=1))
    if count == 0:
        return []
    sizes = ndimage.sum(differs, labels, range(1, count + 1))
    min_pixels = min_fraction * pixels.shape[0] * pixels.shape[1]
    boxes = []
    for index in np.argsort(sizes)[::-1]:
        if sizes[index] < min_pixels:
            break
        ys, xs = np.nonzero(labels == index + 1)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return boxes


def locate_object(image: Image.Image, threshold: float = DIFFERS) -> tuple[int, int, int, int] | None:
    """The box around every area that differs from the background, or None: the picture (a region's crop) holds one
    object, and a patterned object falls apart at the threshold where its stripes or dots come near the background's
    colour (the largest area alone was one stripe of a striped mug; on rendered truth the object of a region was named
    right in 88 % with it, 94 % with the box around every area: README, "A region's object is one object")."""
    boxes = locate_objects(image, threshold=threshold)
    if not boxes:
        return None
    x0, y0, x1, y1 = np.array(boxes).T
    return int(x0.min()), int(y0.min()), int(x1.max()), int(y1.max())


def object_crop(image: Image.Image, box: tuple[int, int, int, int], margin: float = 0.15) -> Image.Image:
    """A square crop around ``box`` with ``margin`` of its size on each side, kept inside the picture."""
    x0, y0, x1, y1 = box
    side = min(int(max(x1 - x0, y1 - y0) * (1 + 2 * margin)), min(image.size))
    left = int(np.clip((x0 + x1) / 2 - side / 2, 0, image.width - side))
    top = int(np.clip((y0 + y1) / 2 - side / 2, 0, image.height - side))
    return image.crop((left, top, left + side, top + side))


def zero_shot(scorer, image: Image.Image, texts: list[str]) -> int:
    """Index of the text the scorer finds closest to the image (the scorer caches the text embeddings)."""
    return int((scorer.embed_images([image]) @ scorer.text_embeddings(texts).T).argmax())


def name_object(scorer, image: Image.Image, classes: list[str]) -> str | None:
    """The class of the object located in ``image`` (``locate_object``), or None when nothing stands out from the
    background."""
    box = locate_object(image)
    if box is None:
        return None
    return classes[zero_shot(scorer, object_crop(image, box), [f"a {c}" for c in classes])]


# ----------------------------------------------------------------------------------------------------------------
# judgements
# ----------------------------------------------------------------------------------------------------------------
def class_present(scorer, crop: Image.Image, class_name: str, classes: list[str]) -> bool:
    """The object located in a subject's own crop is named as the subject's class."""
    return name_object(scorer, crop, classes) == class_name


@dataclass(frozen=True)
class Ghost:
    box: tuple[int, int, int, int]
    class_name: str


def ghost_finder(scorer, config: ProjectConfig):
    """``find_ghosts`` as the pipeline's ghost finder for ``config``'s subjects and class vocabulary:
    (picture, masks) -> ghost boxes."""
    subject_classes, classes = [s.class_name for s in config.subjects], config.presence_classes()

    def find(image: Image.Image, masks_: MaskSet) -> list[tuple[int, int, int, int]]:
        return [g.box for g in find_ghosts(scorer, image, masks_, subject_classes, classes)]

    return find


def grown_box_mask(boxes: list, size: tuple[int, int], grow: float, feather: int) -> np.ndarray:
    """A soft mask (H x W, 0..1) covering every box grown by ``grow`` of its size on each side, feathered inward."""
    width, height = size
    hard = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        dx, dy = grow * (x1 - x0), grow * (y1 - y0)
        hard[max(0, int(y0 - dy)):min(height, int(np.ceil(y1 + dy))),
             max(0, int(x0 - dx)):min(width, int(np.ceil(x1 + dx)))] = True
    if feather <= 0:
        return hard.astype(np.float32)
    inside = ndimage.distance_transform_edt(np.pad(hard, 1, mode="edge"))[1:-1, 1:-1]  # the frame is no edge
    return np.clip(inside / feather, 0.0, 1.0).astype(np.float32)


def find_ghosts(scorer, image: Image.Image, masks_: MaskSet, subject_classes: list[str],
                classes: list[str]) -> list[Ghost]:
    """Objects of a subject's class outside every region: every region (grown by the feather) is painted with the
    background colour, the remaining objects are located and named."""
    pixels = np.array(image.convert("RGB"))
    inside = masks_.union_dilated
    pixels[inside] = background_color(pixels, inside).astype(np.uint8)
    painted = Image.fromarray(pixels)
    ghosts = []
    for box in locate_objects(painted, GHOST_MIN_FRACTION, GHOST_DIFFERS, exclude=inside):
        name = classes[zero_shot(scorer, object_crop(painted, box), [f"a {c}" for c in classes])]
        if name in subject_classes:
            ghosts.append(Ghost(box, name))
    return ghosts


def scene_background_share(image: Image.Image, masks_: MaskSet, subject: str) -> float:
    """How much of the region's inner edge shows the scene's own background: the share of a band along the inner
    edge of the subject's own pixels whose colour is within ``SPLIT_WORLD_DISTANCE`` of the median colour of a band
    around the region (outside every region). A pass that painted another setting into its region (wood inside
    grass) leaves ~0 of it; a subject that fills its region still leaves the scene's background between its edges
    and the region's (rendered truth: >= 0.30 when the subject is as large as its region, <= 0.19 with another
    background; ``tests/test_measures.py``). nan when the region leaves no band to compare."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    own = own_pixels(masks_, subject)
    band = max(2, min(masks_.width, masks_.height) // 32)
    depth = ndimage.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]
    inner = own & (depth > masks_.feather) & (depth <= masks_.feather + 2 * band)
    around = ndimage.distance_transform_edt(~masks_.dilated[subject]) <= 2 * band
    outer = around & ~masks_.union_dilated
    if inner.sum() < 8 or outer.sum() < 8:
        return float("nan")
    scene = np.median(pixels[outer], axis=0)
    return float((np.linalg.norm(pixels[inner] - scene, axis=1) <= SPLIT_WORLD_DISTANCE).mean())


def split_world(image: Image.Image, masks_: MaskSet, subject: str) -> float:
    """1.0 when the region's inner edge hardly shows the scene's background (``scene_background_share`` below
    ``SPLIT_WORLD_MIN_SHARE``), 0.0 when it does, nan when the region leaves no band to compare."""
    return split_world_of(scene_background_share(image, masks_, subject))


def split_world_of(share: float) -> float:
    """The verdict of a ``scene_background_share``: 1.0 below the limit, 0.0 at or above it, nan for nan."""
    return float(share < SPLIT_WORLD_MIN_SHARE) if np.isfinite(share) else float("nan")


__all__ = ["own_pixels", "own_crop", "own_crops", "background_color", "locate_objects", "locate_object",
           "object_crop", "zero_shot", "name_object", "class_present", "Ghost", "find_ghosts",
           "scene_background_share", "split_world", "split_world_of"]
