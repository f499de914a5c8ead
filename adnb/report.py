"""The benchmark's tables and figure, from results records: records in, frames and figures out.

Each record is one method (and variant: its *series*, ``pyramidflow-pretrained``) on one category;
the chapter reads them with ``load_records`` and ``one_per_configuration`` and shows (figures are
pyplot's, like ``adnb.plotting``'s: ``plt.show()`` displays them)::

    frame = records_frame(records)                  # one row per record
    order = series_order(methods, frame.series)     # the series present, in the chapter's order
    quality_table(frame, order), cost_table(frame, order), quality_vs_speed(cost, quality)

A series' mean over categories is the unweighted mean of the papers' tables, and only exists when
the series has a record for every category in the frame: a mean over fewer categories would be
compared with means over more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pandas.io.formats.style import Styler

from adnb.runtime.records import METRIC_KEYS, series

METRIC_NAMES = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO"}
REFERENCES = ("baseline", "knn")  # the floors: drawn as lines across the scatter


def weights_text(weights: Mapping[str, str]) -> str:
    """Where each part's weights came from, e.g. ``"backbone: imagenet"`` (origins, i.e. paths, left out)."""
    return "; ".join(f"{part}: {source}" for part, source in weights.items() if not part.endswith("_origin"))


def records_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: its series, category, metrics (NaN where the data has no masks), costs,
    weights and where it ran."""
    rows = [{"series": series(r), "method": r["method"], "category": r["category"],
             **{k: np.nan if r["metrics"][k] is None else float(r["metrics"][k]) for k in METRIC_KEYS},
             "train_seconds": float(r["train_seconds"]), "infer_images_per_s": float(r["infer_images_per_s"]),
             "n_params": int(r["n_params"]), "peak_memory_mb": float(r.get("peak_memory_mb") or np.nan),
             "weights": weights_text(r["weights"]), "image_size": int(r["image_size"]), "device": r["device"],
             "created": r["created"], "config_hash": r["config_hash"]} for r in records]
    return pd.DataFrame(rows, columns=["series", "method", "category", *METRIC_KEYS, "train_seconds",
                                       "infer_images_per_s", "n_params", "peak_memory_mb", "weights", "image_size",
                                       "device", "created", "config_hash"])


def series_order(methods: Sequence[str], present: Iterable[str]) -> list[str]:
    """The series in ``present``, in the order of their methods in ``methods``, each method's plain
    series before its variants (variants alphabetically); series of other methods are left out."""
    present = set(present)
    order = []
    for method in methods:
        mine = sorted(s for s in present if s == method or s.startswith(f"{method}-"))
        order += sorted(mine, key=lambda s: s != method)
    return order


def missing_methods(methods: Sequence[str], order: Sequence[str]) -> list[str]:
    """The methods of ``methods`` with no series in ``order`` (no records)."""
    return [m for m in methods if not any(s == m or s.startswith(f"{m}-") for s in order)]


def quality_table(frame: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Rows: series in ``order``; columns: (metric, category) for every category, then (metric, "mean")."""
    categories = sorted(frame["category"].unique())
    columns = pd.MultiIndex.from_product([list(METRIC_NAMES.values()), [*categories, "mean"]])
    table = pd.DataFrame(np.nan, index=pd.Index(list(order), name="series"), columns=columns)
    for row in frame.itertuples(index=False):
        if row.series in table.index:
            for key, name in METRIC_NAMES.items():
                table.loc[row.series, (name, row.category)] = getattr(row, key)
    for name in METRIC_NAMES.values():
        table[(name, "mean")] = table[name][categories].mean(axis=1, skipna=False)
    return table


def cost_table(frame: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per series: parameters, mean training seconds per category, mean inference images/s, the
    largest peak memory, the image size(s), the weights that ran and the device(s)."""
    def distinct(values: pd.Series) -> str:
        return " | ".join(dict.fromkeys(str(v) for v in values))

    cost = frame.groupby("series").agg(
        params_M=("n_params", lambda s: s.max() / 1e6), train_s_per_category=("train_seconds", "mean"),
        infer_images_per_s=("infer_images_per_s", "mean"), peak_memory_MB=("peak_memory_mb", "max"),
        image_size=("image_size", distinct), weights=("weights", distinct), device=("device", distinct),
        categories=("category", "nunique"))
    return cost.reindex(list(order))


def style_quality(table: pd.DataFrame) -> Styler:
    """Three decimals, "—" where there is no number, the best of each column in bold."""
    return table.style.format("{:.3f}", na_rep="—").highlight_max(axis=0, props="font-weight: bold")


def style_cost(table: pd.DataFrame) -> Styler:
    return table.style.format({"params_M": "{:.2f}", "train_s_per_category": "{:.1f}", "infer_images_per_s": "{:.1f}",
                               "peak_memory_MB": "{:.0f}"}, na_rep="—")


def headline_metric(quality: pd.DataFrame) -> str:
    """AUPRO when any series has a mean AUPRO (the data has masks), else image AUROC."""
    return "AUPRO" if quality[("AUPRO", "mean")].notna().any() else "I-AUROC"


def quality_bars(quality: pd.DataFrame) -> Figure:
    """One panel per metric: a bar per series and category."""
    categories = [c for c in quality.columns.get_level_values(1).unique() if c != "mean"]
    fig, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(12, 3.2))
    width = 0.8 / max(len(quality.index), 1)
    x = np.arange(len(categories))
    for ax, metric in zip(axes, METRIC_NAMES.values()):
        for i, name in enumerate(quality.index):
            ax.bar(x + i * width, [quality.loc[name, (metric, c)] for c in categories], width, label=name)
        ax.set_xticks(x + width * (len(quality.index) - 1) / 2, categories, fontsize=8)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def quality_vs_speed(cost: pd.DataFrame, quality: pd.DataFrame, *, metric: str = "AUPRO", title: str = "") -> Figure:
    """Mean ``metric`` against inference images/s (log scale), marker area growing with the parameters;
    the references (``REFERENCES``) also as dashed lines across: the levels a method has to clear."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in cost.index:
        x, y = cost.loc[name, "infer_images_per_s"], quality.loc[name, (metric, "mean")]
        if not np.isfinite(y):
            continue  # no mean: a category is missing
        reference = name.split("-")[0] in REFERENCES
        points = ax.scatter(x, y, s=30 + 8 * np.sqrt(cost.loc[name, "params_M"] * 100), alpha=0.7,
                            marker="s" if reference else "o", label=name)
        if reference:
            ax.axhline(y, color=points.get_facecolor()[0], ls="--", lw=1)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"inference images/s ({' | '.join(dict.fromkeys(cost['device'].dropna()))})")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(title)
    return fig


def pretrained_parts(frame: pd.DataFrame) -> dict[str, dict[str, list[str]]]:
    """Per series, its parts whose recorded weights are ``"imagenet…"`` or ``"random…"`` (a pretrained
    part, and whether ImageNet's weights or random ones ran in it): ``{"realnet": {"random": ["backbone"]}}``.
    Series with no such part map to ``{}``."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, texts in frame.groupby("series", sort=False)["weights"]:
        kinds = out.setdefault(name, {})
        for text in dict.fromkeys(texts):
            for part, source in (p.split(": ", 1) for p in text.split("; ") if ": " in p):
                kind = next((k for k in ("imagenet", "random") if source.startswith(k)), None)
                if kind and part not in kinds.get(kind, []):
                    kinds.setdefault(kind, []).append(part)
    return out


def describe_weights(frame: pd.DataFrame) -> str:
    """One Markdown sentence on the pretrained parts, as the records state them: which series ran a
    part with ImageNet weights, which with random weights in its place, and what the others recorded."""
    parts = pretrained_parts(frame)

    def listing(kind: str) -> str:
        return ", ".join(f"{name} ({', '.join(kinds[kind])})" for name, kinds in parts.items() if kind in kinds)

    clauses = []
    if listing("imagenet"):
        clauses.append(f"ImageNet weights ran in {listing('imagenet')}")
    if listing("random"):
        clauses.append(f"**random weights** stood in for ImageNet ones in {listing('random')}, so those numbers "
                       "do not measure the pretrained features the papers used")
    others = {name: " | ".join(dict.fromkeys(frame.loc[frame.series == name, "weights"]))
              for name, kinds in parts.items() if not kinds}
    if others:
        clauses.append("the others recorded " + ", ".join(f"{name} ({text})" for name, text in others.items()))
    return ("In these records, " + "; ".join(clauses) + ".") if clauses else "These records name no weights."
