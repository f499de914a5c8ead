"""Interactive figures: live controls in JupyterLab, the same figure as precomputed frames in the book.

A chapter describes an interactive figure once: its **controls** (a name and the grid of values it
takes) and one or more **views**, functions from some of those values to a matplotlib figure (a
view's parameter names say which controls it depends on). ``explore(*views, controls=...)`` then
shows it the way the reader can use it:

- in a reader's JupyterLab (``make lab``): ipywidgets, a slider for numbers and a dropdown for
  text; moving a control redraws the views that depend on it;
- in batch runs (``ADNB_BATCH=1``: papermill, the book, the tests): every view drawn once at every
  combination of its controls' values, as PNG frames inside one HTML figure whose controls switch
  between them. The published page needs no kernel and no network: ``book/_static/adnb-explore.js``
  (2 KB, added by ``book/_ext/explorers.py`` to the pages that hold such a figure, one file the
  browser caches for every page) shows the frame of the chosen values.

Why precomputed PNG frames rather than plotly or bokeh: the chapters' figures are images and
anomaly maps drawn by matplotlib, which those libraries would re-encode as JSON heatmaps; their
JavaScript alone (plotly 7.1's plotly.min.js: 4.8 MB; bokeh 3.9's bokeh.min.js and its widgets:
1.7 MB) outweighs a chapter's frames (0.15 to 0.6 MB at ci), and would have to be served and kept
offline-safe beside MathJax. With frames, a page weighs what its
grid of values costs and nothing more: a grid of n values is n small images (palette PNGs, and a
frame repeated in a grid is stored once), so chapters keep grids to a handful of values.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from adnb.runtime.errors import AdnbError
from adnb.runtime.progress import is_batch

FRAME_DPI = 80  # frames are read on screen at the column's width, not printed
NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Control:
    """One control: the keyword ``name`` of the views it drives, the grid of ``values`` the book's frames
    cover, the ``label`` a reader sees and the ``value`` it starts at (default: the first).

    Numbers get a slider, anything else a dropdown. ``live`` = (low, high, step) gives JupyterLab a
    continuous slider over that range instead of the book's grid (the grid stays what the book shows).
    """

    name: str
    values: Sequence[Any]
    label: str = ""
    value: Any = None
    live: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if not NAME.match(self.name) or not self.values:
            raise AdnbError(f"control {self.name!r}: a name of lower-case letters, digits, '_' or '-' and at least "
                            "one value are needed")
        if self.value is not None and self.value not in self.values:
            raise AdnbError(f"control {self.name!r} starts at {self.value!r}, which is not one of its values "
                            f"{list(self.values)}: the book's first frame would not show it")
        if self.live is not None and not self.live[0] <= self.values[self.start] <= self.live[1]:
            raise AdnbError(f"control {self.name!r} starts at {self.values[self.start]!r}, outside its live range "
                            f"{self.live[0]}–{self.live[1]}: JupyterLab's slider would move it without a word")

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    @property
    def start(self) -> int:
        return 0 if self.value is None else list(self.values).index(self.value)

    def text(self, value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)


def view_controls(view: Callable[..., Any]) -> list[str]:
    """The names of the controls a view depends on: its parameter names."""
    return list(inspect.signature(view).parameters)


def figure_png(fig: Any, dpi: int = FRAME_DPI) -> bytes:
    """A matplotlib figure as a palette PNG (256 colours: a third of the bytes of RGB for these plots), closed."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05, facecolor="white")
    plt.close(fig)
    image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
    return out.getvalue()


@dataclass
class Explorer:
    """An interactive figure: ``views`` over ``controls`` (see the module docstring)."""

    name: str
    views: Sequence[Callable[..., Any]]
    controls: Sequence[Control]
    caption: str = ""
    last: dict[int, bytes] = field(default_factory=dict)  # the frame each view last drew in the live figure
    inputs: dict[str, Any] = field(default_factory=dict)  # the live figure's control widgets, by name
    errors: list[str] = field(default_factory=list)  # what the live figure's views raised, in order

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise AdnbError(f"interactive figure {self.name!r}: use lower-case letters, digits, '_' or '-'")
        by_name = {c.name: c for c in self.controls}
        if len(by_name) != len(self.controls):
            raise AdnbError(f"interactive figure {self.name!r}: two controls share a name")
        for view in self.views:
            names = view_controls(view)
            unknown = sorted(set(names) - set(by_name))
            if unknown or not names:
                raise AdnbError(f"interactive figure {self.name!r}: view {view.__name__} takes {names}, but the "
                                f"controls are {sorted(by_name)}; a view takes one or more of them by name")
        unused = set(by_name) - {n for v in self.views for n in view_controls(v)}
        if unused:
            raise AdnbError(f"interactive figure {self.name!r}: no view uses control(s) {sorted(unused)}")
        self._by_name = by_name

    def draw(self, index: int, values: dict[str, Any]) -> bytes:
        """View ``index`` at ``values`` (a value per control it takes) as PNG bytes."""
        view = self.views[index]
        return figure_png(view(**{n: values[n] for n in view_controls(view)}))

    # --- the book: every frame, and controls that switch between them

    def frames(self, index: int) -> dict[tuple[int, ...], bytes]:
        """View ``index`` drawn at every combination of its controls' values, keyed by their positions."""
        controls = [self._by_name[n] for n in view_controls(self.views[index])]
        return {positions: self.draw(index, {c.name: c.values[p] for c, p in zip(controls, positions)})
                for positions in itertools.product(*(range(len(c.values)) for c in controls))}

    def html(self) -> str:
        """The figure for a page without a kernel: controls, and every frame of every view."""
        parts = [f'<figure class="adnb-explore" data-name="{self.name}">', '<form class="adnb-explore-controls">']
        for c in self.controls:
            ident = f"adnb-{self.name}-{c.name}"
            labels = html.escape(json.dumps([c.text(v) for v in c.values]), quote=True)
            label = html.escape(c.label or c.name)
            if c.numeric:
                parts.append(f'<label for="{ident}">{label}</label><input type="range" id="{ident}" name="{c.name}" '
                             f'min="0" max="{len(c.values) - 1}" step="1" value="{c.start}" data-labels="{labels}">'
                             f'<output for="{ident}">{html.escape(c.text(c.values[c.start]))}</output>')
            else:
                options = "".join(f'<option value="{i}"{" selected" if i == c.start else ""}>{html.escape(c.text(v))}'
                                  "</option>" for i, v in enumerate(c.values))
                parts.append(f'<label for="{ident}">{label}</label><select id="{ident}" name="{c.name}" '
                             f'data-labels="{labels}">{options}</select>')
        parts.append("</form>")
        for index, view in enumerate(self.views):
            names = view_controls(view)
            start = tuple(self._by_name[n].start for n in names)
            parts.append(f'<div class="adnb-explore-view" data-controls="{" ".join(names)}">')
            stored: dict[bytes, list[tuple[int, ...]]] = {}  # one <img> per distinct frame, listing its keys
            for positions, png in self.frames(index).items():
                stored.setdefault(png, []).append(positions)
            for png, keys in stored.items():
                hidden = "" if start in keys else " hidden"
                alt = html.escape(f"{view.__name__.replace('_', ' ')} at " + ", ".join(
                    f"{n} = {self._by_name[n].text(self._by_name[n].values[p])}" for n, p in zip(names, keys[0])))
                data = base64.b64encode(png).decode()
                parts.append(f'<img src="data:image/png;base64,{data}" alt="{alt}" '
                             f'data-keys="{" ".join(",".join(map(str, k)) for k in keys)}"{hidden}>')
            parts.append("</div>")
        if self.caption:
            parts.append(f"<figcaption>{html.escape(self.caption)}</figcaption>")
        parts.append("</figure>")
        return "".join(parts)

    # --- JupyterLab: ipywidgets, each view redrawn when one of its controls moves

    def widget(self) -> Any:
        """The live figure: controls above, views below (an ipywidgets box).

        Each view is an image widget whose PNG is replaced when one of its controls moves (no output
        capture: one message per redraw). A view that fails at first draw fails the cell; one that fails
        after a move says so under the figure, and the reader moves the control back.
        """
        import ipywidgets as widgets

        controls = self.inputs = {c.name: _control_widget(c) for c in self.controls}
        message = widgets.HTML()
        images = []
        for index, view in enumerate(self.views):
            names = view_controls(view)
            self.last[index] = self.draw(index, {n: controls[n].value for n in names})
            image = widgets.Image(value=self.last[index], format="png", layout=widgets.Layout(max_width="100%"))

            def redraw(_: Any = None, index: int = index, image: Any = image, names: list[str] = names) -> None:
                try:
                    self.last[index] = image.value = self.draw(index, {n: controls[n].value for n in names})
                    message.value = ""
                except Exception as error:  # shown in the figure: an observer's exception would reach no cell
                    self.errors.append(f"{self.views[index].__name__}: {type(error).__name__}: {error}")
                    message.value = f"<b>{html.escape(self.errors[-1])}</b>"

            for name in names:
                controls[name].observe(redraw, "value")
            images.append(image)
        rows = [widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap")), *images, message]
        if self.caption:
            rows.append(widgets.HTML(f"<em>{html.escape(self.caption)}</em>"))
        return widgets.VBox(rows)

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        SHOWN.append(self)
        display(HTML(self.html()) if is_batch() else self.widget())


SHOWN: list[Explorer] = []  # the figures displayed in this kernel, in order (the widget tests drive them)


def _control_widget(control: Control) -> Any:
    import ipywidgets as widgets

    common = {"description": control.label or control.name, "continuous_update": False,
              "style": {"description_width": "initial"}}
    start = control.values[control.start]
    if control.live is not None:
        low, high, step = control.live
        kind = widgets.IntSlider if all(isinstance(v, int) for v in (low, high, step, start)) else widgets.FloatSlider
        return kind(value=start, min=low, max=high, step=step, **common)
    if control.numeric:
        return widgets.SelectionSlider(options=[(control.text(v), v) for v in control.values], value=start, **common)
    common.pop("continuous_update")
    return widgets.Dropdown(options=[(control.text(v), v) for v in control.values], value=start, **common)


def explore(*views: Callable[..., Any], controls: Sequence[Control], name: str, caption: str = "") -> Explorer:
    """An interactive figure of ``views`` over ``controls``; displayed when it is a cell's last expression."""
    return Explorer(name, list(views), list(controls), caption)
