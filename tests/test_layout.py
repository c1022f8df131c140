import json

import numpy as np
import pytest

from helpers.layout import (Layout, LayoutError, Region, default_layout, gap_between, load_or_default_layout, masks,
                            overlap_fraction, validate_layout)

NAMES = ["cat", "mug"]


def _layout(*regions):
    return Layout(list(regions), 1024, 1024)


@pytest.mark.parametrize("layout, message", [
    (_layout(Region("cat", 0.1, 0.1, 0.3, 0.3)), r"no region for mug"),
    (_layout(Region("cat", 0.1, 0.1, 0.3, 0.3), Region("mug", 0.6, 0.1, 0.3, 0.3), Region("dog", 0.1, 0.6, .3, .3)),
     r"unknown subject\(s\) dog"),
    (_layout(Region("cat", 0.1, 0.1, 0.3, 0.3), Region("cat", 0.6, 0.1, 0.3, 0.3)), r"more than one region.*cat"),
    (_layout(Region("cat", 0.8, 0.1, 0.3, 0.3), Region("mug", 0.1, 0.5, 0.3, 0.3)), r"'cat'.*leaves the canvas"),
    (_layout(Region("cat", 0.1, 0.1, 0.03, 0.3), Region("mug", 0.5, 0.5, 0.3, 0.3)), r"'cat'.*smaller than"),
    (_layout(Region("cat", 0.1, 0.1, 0.4, 0.4), Region("mug", 0.2, 0.2, 0.4, 0.4)), r"'cat' and 'mug' overlap by \d+%"),
    (_layout(Region("cat", 0.1, 0.1, 0.3, 0.3, "star"), Region("mug", 0.5, 0.5, 0.3, 0.3)), r"'cat'.*unknown shape"),
])
def test_each_failure_names_the_subject(layout, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(layout, NAMES)


def test_minimum_gap_is_optional():
    layout = _layout(Region("cat", 0.1, 0.3, 0.4, 0.4, "box"), Region("mug", 0.51, 0.3, 0.4, 0.4, "box"))
    validate_layout(layout, NAMES)
    assert gap_between(*layout.regions) == pytest.approx(0.01, abs=0.01)
    with pytest.raises(LayoutError, match=r"'cat' and 'mug' are 0\.\d+ apart"):
        validate_layout(layout, NAMES, min_gap=0.05)


@pytest.mark.parametrize("n", range(1, 7))
def test_default_layouts_are_valid_and_disjoint(n):
    names = [f"s{i}" for i in range(n)]
    layout = default_layout(names)
    validate_layout(layout, names, max_overlap=0.0, min_gap=0.01)
    assert layout.subjects == names
    for i, a in enumerate(layout.regions):
        for b in layout.regions[i + 1:]:
            assert overlap_fraction(a, b) == 0
    if n == 2:  # side by side
        (a, b) = layout.regions
        assert a.y == b.y and a.x + a.w < b.x


def test_default_layout_refuses_seven():
    with pytest.raises(LayoutError, match="1-6"):
        default_layout([f"s{i}" for i in range(7)])


@pytest.mark.parametrize("width, height", [(64, 64), (96, 64), (48, 80)])
def test_mask_properties(width, height):
    layout = _layout(Region("cat", 0.05, 0.2, 0.5, 0.6), Region("mug", 0.45, 0.2, 0.5, 0.6, "box"))  # 10 % overlap
    m = masks(layout, width, height, feather=3)
    for name in NAMES:
        soft = m.soft[name]
        assert soft.shape == (height, width) and soft.dtype == np.float32
        assert soft.min() == 0.0 and soft.max() == 1.0
        assert ((soft > 0) & (soft < 1)).any()  # feathered
        assert not (m.support[name] & ~m.dilated[name]).any()
    assert not (m.core["cat"] & m.core["mug"]).any()  # hard cores never overlap, even when regions do
    assert not (m.support["cat"] & m.support["mug"]).any()
    assert 0 < m.areas()["cat"] < 0.5


def test_ellipse_is_smaller_than_its_box():
    box = masks(_layout(Region("cat", 0.2, 0.2, 0.6, 0.6, "box")), 100, 100, 0).support["cat"].mean()
    ellipse = masks(_layout(Region("cat", 0.2, 0.2, 0.6, 0.6)), 100, 100, 0).support["cat"].mean()
    assert box == pytest.approx(0.36, abs=0.01) and ellipse == pytest.approx(0.36 * np.pi / 4, abs=0.01)


def test_json_round_trip_and_malformed_files(tmp_path):
    layout = default_layout(NAMES, 96, 64)
    path = layout.save(tmp_path / "layout.json")
    assert Layout.load(path) == layout
    data = json.loads(path.read_text())
    del data["regions"][1]["w"]
    path.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"layout.json: missing key 'w' in regions\[1\]"):
        Layout.load(path)
    path.write_text("{")
    with pytest.raises(LayoutError, match="layout.json: not valid JSON"):
        Layout.load(path)
    path.write_text(json.dumps({"version": 99, "regions": [], "width": 1, "height": 1}))
    with pytest.raises(LayoutError, match="schema version 99"):
        Layout.load(path)
    with pytest.raises(LayoutError, match="notebooks/02"):
        Layout.load(tmp_path / "missing.json")


def test_load_or_default_layout(tmp_path):
    layout, note = load_or_default_layout(tmp_path / "layout.json", NAMES, 64, 64)
    assert "default layout" in note and layout.subjects == NAMES
    layout.save(tmp_path / "layout.json")
    again, note = load_or_default_layout(tmp_path / "layout.json", NAMES, 64, 64)
    assert note.startswith("loaded") and again == layout
    with pytest.raises(LayoutError, match="no region for dog"):
        load_or_default_layout(tmp_path / "layout.json", NAMES + ["dog"], 64, 64)
