import warnings

import numpy as np
import pytest
from PIL import Image

from helpers.config import ProjectConfig, Subject
from helpers.data import SubjectDataError, augment, load_photo, load_subject_photos, make_demo_subjects


def _config(folder, name="toy"):
    return ProjectConfig(subjects=[Subject(name, "sks", "toy", str(folder), f"loras/{name}")], train_resolution=64)


def _photo(mode="RGB", size=(96, 80), color=(200, 30, 30)):
    """A colour with a contrasting block in it (a single flat colour is refused as a photo with nothing in it)."""
    if mode == "CMYK":
        image = Image.new("CMYK", size, (0, 200, 200, 0))
        image.paste((200, 0, 0, 0), (0, 0, size[0] // 2, size[1] // 2))
        return image
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    return image.convert(mode)


def test_missing_and_empty_folders_name_folder_and_subject(tmp_path):
    missing = _config(tmp_path / "nope")
    with pytest.raises(SubjectDataError, match=r"subject 'toy'.*nope does not exist"):
        load_subject_photos(missing, missing.subjects[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(SubjectDataError, match=r"subject 'toy'.*empty.*no images"):
        load_subject_photos(_config(tmp_path / "empty"), _config(tmp_path / "empty").subjects[0])


def test_corrupt_file_is_named(subject_dir):
    (subject_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(SubjectDataError, match="broken.jpg: cannot read"):
        load_photo(subject_dir / "broken.jpg", 64)


def test_too_small_is_rejected(subject_dir):
    _photo(size=(40, 300)).save(subject_dir / "small.png")
    with pytest.raises(SubjectDataError, match=r"small.png: 40x300 px is too small"):
        load_photo(subject_dir / "small.png", 64)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_modes_become_rgb(subject_dir, mode):
    path = subject_dir / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    _photo(mode).save(path)
    image = load_photo(path, 64)
    assert image.mode == "RGB" and image.size == (96, 80)


def test_transparent_pixels_become_white(subject_dir):
    rgba = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (40, 0, 80, 80))  # the right half is opaque blue
    rgba.save(subject_dir / "t.png")
    assert load_photo(subject_dir / "t.png", 64).getpixel((5, 5)) == (255, 255, 255)


def test_exif_rotation_is_applied(subject_dir):
    image = Image.new("RGB", (120, 80), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 80))  # a white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(subject_dir / "phone.jpg", exif=exif)
    upright = load_photo(subject_dir / "phone.jpg", 64)
    assert upright.size == (80, 120)
    assert np.asarray(upright)[:10].mean() > 200  # the stripe is now at the top


def test_fewer_than_three_photos_warns(subject_dir):
    _photo().save(subject_dir / "a.png")
    with pytest.warns(UserWarning, match="only 1 photo"):
        load_subject_photos(_config(subject_dir), _config(subject_dir).subjects[0])


def test_augment_is_seeded_and_sized():
    import random
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8))
    a = augment(image, 64, random.Random(1))
    b = augment(image, 64, random.Random(1))
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))


def test_without_flip_no_view_is_mirrored_and_the_crops_stay_the_same():
    import random
    photo = _photo()  # its blue block is top left: a mirrored view has it top right
    views = {flip: [np.asarray(augment(photo, 64, rng, flip)) for rng in [random.Random(1)] for _ in range(12)]
             for flip in (True, False)}
    block_on_the_left = [v[..., 2][:, :32].mean() > v[..., 2][:, 32:].mean() for v in views[False]]
    assert all(block_on_the_left)
    mirrored = [not np.array_equal(a, b) for a, b in zip(views[True], views[False])]
    assert any(mirrored) and not all(mirrored)  # a coin per view; unflipped views are the very same crops
    for a, b, was_mirrored in zip(views[True], views[False], mirrored):
        assert np.array_equal(a, b[:, ::-1] if was_mirrored else b)


def test_demo_subjects_are_distinct_views(tmp_path):
    written = make_demo_subjects(tmp_path)
    assert {p.parent.name for p in written} == {"cat", "mug"}
    cats = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "cat").iterdir())]
    assert len(cats) >= 3 and all(not np.array_equal(cats[0], c) for c in cats[1:])
    assert make_demo_subjects(tmp_path) == []  # existing files are never overwritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ProjectConfig(subjects=[Subject("cat", "sks", "cat", str(tmp_path / "cat"), "loras/cat")])
        assert len(load_subject_photos(config, config.subjects[0])) == len(cats)


def test_uploaded_photos_are_checked_stored_once_and_a_bad_one_writes_nothing(tmp_path):
    import io as bytes_io

    from helpers.data import add_photos
    config = ProjectConfig(subjects=[Subject("toy", "qwe", "toy", str(tmp_path / "toy"), "loras/toy")])
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
    good = buffer.getvalue()
    written = add_photos(config, config.subjects[0], [("a.png", good), ("copy.png", good)])
    assert len(set(written)) == 1 and written[0].read_bytes() == good  # the same photo twice is stored once
    with pytest.raises(SubjectDataError, match="broken.jpg"):
        add_photos(config, config.subjects[0], [("fine.png", good), ("broken.jpg", b"not an image")])
    with pytest.raises(SubjectDataError, match="notes.txt"):
        add_photos(config, config.subjects[0], [("notes.txt", b"hello")])
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == [written[0].name]


def test_persist_to_drive_outside_colab_says_so_and_changes_nothing(tmp_path, capsys):
    from helpers.notebook import notebook_config
    config = notebook_config("00", {"profile": "tiny", "output_dir": str(tmp_path), "persist_to_drive": True})
    assert config.output_path == tmp_path
    assert "not running in Colab" in capsys.readouterr().out


def test_the_upload_widget_stores_what_is_uploaded_and_shows_refusals(tmp_path):
    import io as bytes_io

    from helpers.data import upload_widget
    config = ProjectConfig(subjects=[Subject("toy", "qwe", "toy", str(tmp_path / "toy"), "loras/toy")])
    widget = upload_widget(config)
    upload, status = widget.children[0].children
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
    new = ({"name": "toy.png", "content": memoryview(buffer.getvalue())},)  # ipywidgets 8's shape of an upload
    upload.notify_change({"name": "value", "old": (), "new": new, "owner": upload, "type": "change"})
    assert len(list((tmp_path / "toy").iterdir())) == 1 and "1 photo(s)" in status.value
    legacy = {"x.jpg": {"metadata": {"name": "x.jpg"}, "content": b"broken"}}  # ipywidgets 7.7's shape
    upload.notify_change({"name": "value", "old": (), "new": legacy, "owner": upload, "type": "change"})
    assert "x.jpg" in status.value and len(list((tmp_path / "toy").iterdir())) == 1


def test_a_photos_mask_is_read_beside_it_cropped_with_it_and_never_taken_for_a_photo(tmp_path):
    import random

    from helpers.data import augment_with_mask, load_subject_masks, photo_inventory

    config = _config(tmp_path)
    for name in ("a", "b"):
        _photo().save(tmp_path / f"{name}.png")
    assert load_subject_masks(config, config.subjects[0]) is None  # no masks: the whole photo, as before
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (0, 0, 48, 40))  # the photo's contrasting block
    mask.save(tmp_path / "a.mask.png")
    assert load_subject_masks(config, config.subjects[0]) is None  # not every photo has one
    mask.save(tmp_path / "b.mask.png")
    used, ignored = photo_inventory(tmp_path)
    assert [p.name for p in used] == ["a.png", "b.png"] and ignored == []
    masks = load_subject_masks(config, config.subjects[0])
    assert len(masks) == 2 and masks[0].mode == "L"
    view, view_mask = augment_with_mask(_photo(), masks[0], 64, random.Random(3))
    assert np.array_equal(np.asarray(view), np.asarray(augment(_photo(), 64, random.Random(3))))
    blue = np.asarray(view)[..., 2] > 150  # the block, wherever the crop and flip put it
    assert (np.asarray(view_mask)[blue] > 127).mean() > 0.95 and (np.asarray(view_mask)[~blue] < 128).mean() > 0.95
    Image.new("L", (40, 40), 255).save(tmp_path / "b.mask.png")
    with pytest.raises(SubjectDataError, match=r"b\.mask\.png: the mask is 40x40 px, its photo 96x80"):
        load_subject_masks(config, config.subjects[0])
