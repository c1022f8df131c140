"""The layout designer: ipywidgets controls per subject, a live preview, inline validation, a Save button.

Built only from core widgets (FloatSlider, Dropdown, Button, HTML, Image, HBox/VBox) whose API is the same in
ipywidgets 7.7 (Colab) and 8.x (JupyterLab): no custom JavaScript, no extra front-end extension to install. The
preview is drawn with PIL and sent as PNG bytes to an ``Image`` widget, which both versions render identically.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .layout import SHAPES, Layout, LayoutError, Region, default_layout, validate_layout
from .layout import SUBJECT_COLORS as COLORS


def render_preview(layout: Layout, size: int = 384, background: Image.Image | None = None) -> Image.Image:
    """Every region outlined and tinted in its own colour, labelled with its subject, over the background."""
    height = round(size * layout.height / layout.width)
    base = background.convert("RGB").resize((size, height)) if background else Image.new("RGB", (size, height),
                                                                                           "#f4f1ea")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i, region in enumerate(layout.regions):
        color = COLORS[i % len(COLORS)]
        left, top, right, bottom = region.pixel_box(size, height)
        box = (left, top, right - 1, bottom - 1)
        rgb = tuple(int(color[k:k + 2], 16) for k in (1, 3, 5))
        shape = draw.ellipse if region.shape == "ellipse" else draw.rectangle
        shape(box, fill=rgb + (70,), outline=rgb + (255,), width=3)
        draw.rectangle((left, top, left + 8 * len(region.subject) + 8, top + 16), fill=rgb + (230,))
        draw.text((left + 4, top + 2), region.subject, fill=(255, 255, 255, 255))
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class LayoutDesigner:
    """``display(LayoutDesigner(...).widget)``; ``.layout`` is always the current (possibly invalid) layout."""

    def __init__(self, subject_names: list[str], layout: Layout | None = None, save_path: str | Path | None = None,
                 background: Image.Image | None = None, preview_size: int = 384, width: int = 1024,
                 height: int = 1024):
        import ipywidgets as w

        self.subject_names = list(subject_names)
        self.layout = layout or default_layout(self.subject_names, width, height)
        self.save_path = Path(save_path) if save_path else None
        self.background, self.preview_size = background, preview_size
        self.controls: dict[str, dict[str, w.Widget]] = {}
        rows = []
        for i, name in enumerate(self.subject_names):
            region = self.layout.region(name)
            color = COLORS[i % len(COLORS)]
            sliders = {key: w.FloatSlider(value=getattr(region, key), min=0.0, max=1.0, step=0.01, description=key,
                                          continuous_update=False, readout_format=".2f",
                                          layout=w.Layout(width="220px"))
                       for key in ("x", "y", "w", "h")}
            shape = w.Dropdown(options=list(SHAPES), value=region.shape, description="shape",
                               layout=w.Layout(width="180px"))
            self.controls[name] = {**sliders, "shape": shape}
            for control in self.controls[name].values():
                control.observe(self._on_change, names="value")
            label = w.HTML(f"<b style='color:{color}'>{name}</b>", layout=w.Layout(width="70px"))
            rows.append(w.HBox([label, shape, w.VBox([w.HBox([sliders["x"], sliders["y"]]),
                                                      w.HBox([sliders["w"], sliders["h"]])])]))
        self.preview = w.Image(format="png", layout=w.Layout(width=f"{preview_size}px"))
        self.message = w.HTML()
        self.save_button = w.Button(description="Save layout", button_style="primary", icon="save")
        self.save_button.on_click(lambda _: self.save())
        self.widget = w.VBox([w.HTML("<h3>Layout designer</h3>"), *rows, self.preview, self.message,
                              self.save_button])
        self.widget.add_class("layout-designer")
        self._refresh()

    def _read_controls(self) -> Layout:
        regions = [Region(name, *(float(c[k].value) for k in ("x", "y", "w", "h")), shape=c["shape"].value)
                   for name, c in self.controls.items()]
        return Layout(regions, self.layout.width, self.layout.height)

    def _on_change(self, _change=None) -> None:
        self.layout = self._read_controls()
        self._refresh()

    def validation_error(self) -> str | None:
        try:
            validate_layout(self.layout, self.subject_names)
        except LayoutError as e:
            return str(e)
        return None

    def _refresh(self) -> None:
        self.preview.value = _png_bytes(render_preview(self.layout, self.preview_size, self.background))
        error = self.validation_error()
        self.message.value = (f"<span style='color:#b00020'>&#9888; {error}</span>" if error
                              else "<span style='color:#1b7f3b'>&#10003; layout is valid</span>")
        self.save_button.disabled = error is not None

    def set_region(self, name: str, **values: float | str) -> None:
        """Programmatic edit (same path as moving a slider)."""
        for key, value in values.items():
            self.controls[name][key].value = value

    def save(self) -> Path | None:
        error = self.validation_error()
        if error or self.save_path is None:
            self.message.value = f"<span style='color:#b00020'>not saved: {error or 'no save path'}</span>"
            return None
        path = self.layout.save(self.save_path)
        self.message.value = f"<span style='color:#1b7f3b'>&#10003; saved {path.name}</span>"
        return path

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
