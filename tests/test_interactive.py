"""adnb.interactive: one description of an interactive figure, live ipywidgets or precomputed frames."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from adnb import interactive  # noqa: E402
from adnb.interactive import Control, Explorer, explore  # noqa: E402
from adnb.plotting import epoch_curve  # noqa: E402
from adnb.runtime.errors import AdnbError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bars(height: float, colour: str = "tab:blue"):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.bar([0], [height], color=colour)
    ax.set_ylim(0, 4)
    return fig


def tall(height: float):
    return bars(height)


def coarse(height: float):
    """The same picture for heights 1 and 2: a frame repeated in the grid."""
    return bars(1.0 if height <= 2 else height)


def test_controls_and_views_must_match():
    with pytest.raises(AdnbError, match="not one of its values"):
        Control("height", [1, 2], value=3)
    with pytest.raises(AdnbError, match="takes \\['width'\\]"):
        explore(lambda width: bars(width), controls=[Control("height", [1, 2])], name="x")
    with pytest.raises(AdnbError, match="no view uses control"):
        explore(coarse, controls=[Control("height", [1, 2]), Control("width", [1, 2])], name="x")
    with pytest.raises(AdnbError, match="lower-case"):
        explore(bars, controls=[Control("height", [1, 2])], name="Bad Name")


def test_book_figure_has_one_frame_per_distinct_picture_and_shows_the_start():
    figure = explore(bars, coarse, name="demo", controls=[
        Control("height", [1, 2, 3], "height", value=2), Control("colour", ["tab:blue", "tab:red"], "colour")])
    page = figure.html()
    views = re.findall(r'<div class="adnb-explore-view" data-controls="([^"]*)">(.*?)</div>', page)
    assert [names for names, _ in views] == ["height colour", "height"]
    first = re.findall(r'data-keys="([^"]*)"( hidden)?', views[0][1])
    assert sorted(k for keys, _ in first for k in keys.split()) == sorted(f"{h},{c}" for h in range(3) for c in range(2))
    assert [keys for keys, hidden in first if not hidden] == ["1,0"]  # height 2, the first colour
    second = re.findall(r'data-keys="([^"]*)"( hidden)?', views[1][1])
    assert len(second) == 2 and "0 1" in [keys for keys, _ in second]  # heights 1 and 2 share one stored frame
    assert '<input type="range"' in page and 'max="2"' in page and 'value="1"' in page  # numbers: a slider
    assert '<select id="adnb-demo-colour"' in page and '<option value="0" selected>' in page  # text: a dropdown
    assert '<output for="adnb-demo-height">2</output>' in page


def test_frames_are_palette_pngs():
    png = interactive.figure_png(bars(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[25] == 3  # colour type 3: indexed
    assert not plt.get_fignums(), "the figure is closed once drawn"


def test_live_figure_redraws_the_views_of_the_moved_control():
    figure = explore(bars, coarse, name="demo", controls=[Control("height", [1, 2, 3]),
                                                         Control("colour", ["tab:blue", "tab:red"])])
    figure.widget()
    before = dict(figure.last)
    figure.inputs["colour"].value = "tab:red"
    assert figure.last[0] != before[0] and figure.last[1] == before[1]  # only the view that takes the colour
    figure.inputs["height"].value = 3
    assert figure.last[1] != before[1]


def test_live_slider_can_be_finer_than_the_books_grid():
    figure = explore(tall, name="demo", controls=[Control("height", [1.0, 2.0], value=2.0, live=(0.5, 3.5, 0.5))])
    figure.widget()
    slider = figure.inputs["height"]
    assert type(slider).__name__ == "FloatSlider" and (slider.min, slider.max, slider.value) == (0.5, 3.5, 2.0)
    slider.value = 2.5  # not in the book's grid
    assert figure.last[0]


def test_a_failing_view_fails_the_figure():
    def broken(height):
        raise ValueError("no picture")

    with pytest.raises(ValueError, match="no picture"):
        Explorer("demo", [broken], [Control("height", [1, 2])]).html()
    with pytest.raises(ValueError, match="no picture"):
        Explorer("demo", [broken], [Control("height", [1, 2])]).widget()


def test_a_view_that_fails_after_a_move_says_so_in_the_figure():
    def fragile(height):
        if height > 1:
            raise ValueError("too tall")
        return bars(height)

    figure = explore(fragile, name="demo", controls=[Control("height", [1, 2])])
    box = figure.widget()
    figure.inputs["height"].value = 2
    assert figure.errors == ["fragile: ValueError: too tall"]
    assert "too tall" in box.children[-1].value  # the message under the views
    figure.inputs["height"].value = 1
    assert box.children[-1].value == ""


@pytest.mark.parametrize("batch", ["1", "0"])
def test_displayed_as_frames_in_batch_runs_and_as_widgets_live(batch, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    monkeypatch.setenv("ADNB_BATCH", batch)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    figure = explore(tall, name="demo", controls=[Control("height", [1, 2])])
    figure._ipython_display_()
    assert interactive.SHOWN[-1] is figure
    if batch == "1":
        assert isinstance(shown[-1], IPython.display.HTML) and 'class="adnb-explore"' in shown[-1].data
    else:
        assert type(shown[-1]).__name__ == "VBox"


def test_a_one_epoch_curve_is_a_point():
    fig, ax = plt.subplots()
    epoch_curve(ax, [0.7])
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and list(line.get_xdata()) == [1]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)


def test_the_book_loads_the_script_on_pages_with_a_figure_only():
    from docutils import nodes
    from docutils.core import publish_doctree

    sys.path.insert(0, str(ROOT / "book" / "_ext"))
    try:
        import explorers
    finally:
        sys.path.pop(0)
    page = publish_doctree("A page.")
    assert not explorers.has_explorer(page)
    page += nodes.raw("", explore(tall, name="demo", controls=[Control("height", [1])]).html(), format="html")
    assert explorers.has_explorer(page)
    assert (ROOT / "book" / "_static" / "adnb-explore.js").is_file() and (ROOT / "book" / "_static" / "adnb-explore.css").is_file()
