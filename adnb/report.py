"""The benchmark's tables and figure, from results records: records in, frames and figures out.

Each record is one method (and variant: its *series*, ``pyramidflow-pretrained``) on one category;
the chapter reads them with ``load_records`` and ``one_per_configuration`` and shows (figures are
pyplot's, like ``adnb.plotting``'s: ``plt.show()`` displays them)::

    frame = records_frame(records)                  # one row per record
    groups = by_protocol(frame)                     # records scored alike; compared only within one
    order = series_order(methods, frame.series)     # the series present, in the chapter's order
    quality_table(frame, order), cost_table(frame, order), quality_vs_speed(cost, quality)

A series' mean over categories is the unweighted mean of the papers' tables, and only exists when
the series has a record for every category in the frame: a mean over fewer categories would be
compared with means over more.

Every number comes with its 95 % interval (the records' ``intervals``, a bootstrap over test
images). The mean's interval is ``mean ± 1.96·√(Σ_c se_c²)/C`` from the categories' bootstrap
standard errors (independent test sets). Two numbers compare by ``compare``: one is above the
other only when their intervals do not overlap (``low_A > high_B``); otherwise they are *tied*.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from pandas.io.formats.style import Styler

from adnb.intervals import Estimate
from adnb.runtime.records import METRIC_KEYS, series

METRIC_NAMES = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "aupro": "AUPRO"}
Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval
NATIVE = "native mask size"


def compare(a: Estimate, b: Estimate) -> str:
    """``"above"`` if ``a.low > b.high``, ``"below"`` if ``a.high < b.low``, else ``"tied"``.

    The rule: two numbers differ only when their 95 % intervals are disjoint. A missing bound counts
    as unbounded, so a number without an interval is never declared better or worse.
    """
    a_low, a_high = (a.low if np.isfinite(a.low) else -np.inf), (a.high if np.isfinite(a.high) else np.inf)
    b_low, b_high = (b.low if np.isfinite(b.low) else -np.inf), (b.high if np.isfinite(b.high) else np.inf)
    if a_low > b_high:
        return "above"
    if a_high < b_low:
        return "below"
    return "tied"


def best(estimates: Mapping[str, Estimate]) -> tuple[str, list[str]]:
    """The name with the largest value, and the others tied with it by ``compare`` (in the given order)."""
    shown = {name: e for name, e in estimates.items() if np.isfinite(e.value)}
    if not shown:
        raise ValueError("no finite value to rank")
    top = max(shown, key=lambda name: shown[name].value)
    return top, [name for name, e in shown.items() if name != top and compare(e, shown[top]) == "tied"]


def versus(estimates: Mapping[str, Estimate], reference: str, candidates: Sequence[str]) -> dict[str, list[str]]:
    """The candidates ``"above"``, ``"tied"`` with and ``"below"`` ``reference`` by ``compare``."""
    out: dict[str, list[str]] = {"above": [], "tied": [], "below": []}
    for name in candidates:
        if name in estimates and np.isfinite(estimates[name].value):
            out[compare(estimates[name], estimates[reference])].append(name)
    return out


def estimate(source: Any, key: str) -> Estimate:
    """Metric ``key`` of an ``Evaluation`` or a results record, with its interval."""
    metrics, intervals, _ = _parts(source)
    value, bounds = metrics.get(key), intervals.get(key)
    if value is None:
        return Estimate(float("nan"))
    return Estimate(float(value), *(bounds if bounds is not None else (float("nan"), float("nan"))))


def _parts(source: Any) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """(metrics, intervals, standard errors) of an ``Evaluation`` or a results record."""
    if isinstance(source, Mapping):
        return source["metrics"], source.get("intervals") or {}, (source.get("intervals_method") or {}).get("se") or {}
    boot = getattr(source, "bootstrap", None)
    return source.metrics, source.intervals, (boot.se if boot is not None else {})


def mean_of(sources: Sequence[Any], key: str) -> Estimate:
    """The unweighted mean of metric ``key`` over several evaluations or records (one per category), with its
    interval (``mean_estimate``); NaN where one lacks the metric."""
    values = [estimate(s, key).value for s in sources]
    se = [_parts(s)[2].get(key) for s in sources]
    if not sources or not np.isfinite(values).all():
        return Estimate(float("nan"))
    return mean_estimate(values, [np.nan if v is None else v for v in se])


def metrics_table(rows: Mapping[str, Any], *, mean: str | None = None) -> pd.DataFrame:
    """One row per name: the three metrics of an ``Evaluation`` or a record as ``value [low, high]``
    (``—`` where there is none); with ``mean``, a last row of that name holds the means over the rows
    and their intervals (``mean_of``)."""
    table = {name: {label: str(estimate(source, key)) for key, label in METRIC_NAMES.items()}
             for name, source in rows.items()}
    if mean is not None:
        table[mean] = {label: str(mean_of(list(rows.values()), key)) for key, label in METRIC_NAMES.items()}
    return pd.DataFrame(table).T


def mean_estimate(values: Sequence[float], se: Sequence[float]) -> Estimate:
    """The unweighted mean of per-category values, with ``± Z_95·√(Σ se²)/C`` (NaN bounds if any se is)."""
    values, se = np.asarray(values, dtype=np.float64), np.asarray(se, dtype=np.float64)
    mean = float(values.mean()) if values.size else float("nan")
    half = Z_95 * float(np.sqrt(np.sum(se ** 2))) / max(values.size, 1)
    return Estimate(mean, max(mean - half, 0.0), min(mean + half, 1.0))


def protocol(record: Mapping[str, Any]) -> str:
    """How a record's pixel metrics were scored: at the masks' native size, or against masks resized to the
    model's input (``"model input 128²"``): numbers of two protocols are not compared."""
    resolution = record.get("eval_resolution")
    if resolution == "native":
        return NATIVE
    if resolution == "model":
        return f"model input {int(record['image_size'])}²"
    return "unrecorded"


def weights_text(weights: Mapping[str, str]) -> str:
    """Where each part's weights came from, e.g. ``"backbone: imagenet"`` (origins, i.e. paths, left out)."""
    return "; ".join(f"{part}: {source}" for part, source in weights.items() if not part.endswith("_origin"))


def records_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: its series, category, metrics (NaN where the data has no masks), costs,
    weights and where it ran."""
    rows = [{"series": series(r), "method": r["method"], "category": r["category"],
             **{k: _number(r["metrics"][k]) for k in METRIC_KEYS},
             **{f"{k}_{end}": _number((r.get("intervals") or {}).get(k), i) for k in METRIC_KEYS
                for i, end in enumerate(("low", "high"))},
             **{f"{k}_se": _number(((r.get("intervals_method") or {}).get("se") or {}).get(k)) for k in METRIC_KEYS},
             "train_seconds": float(r["train_seconds"]), "infer_images_per_s": float(r["infer_images_per_s"]),
             "n_params": int(r["n_params"]), "peak_memory_mb": float(r.get("peak_memory_mb") or np.nan),
             "weights": weights_text(r["weights"]), "image_size": int(r["image_size"]), "device": r["device"],
             "eval_resolution": r.get("eval_resolution") or "unrecorded", "protocol": protocol(r),
             "precision": r.get("precision") or "unrecorded", "n_test": r.get("n_test"),
             "created": r["created"], "config_hash": r["config_hash"]} for r in records]
    bounds = [f"{k}_{end}" for k in METRIC_KEYS for end in ("low", "high", "se")]
    return pd.DataFrame(rows, columns=["series", "method", "category", *METRIC_KEYS, *bounds, "train_seconds",
                                       "infer_images_per_s", "n_params", "peak_memory_mb", "weights", "image_size",
                                       "device", "eval_resolution", "protocol", "precision", "n_test", "created",
                                       "config_hash"])


def _number(value: Any, index: int | None = None) -> float:
    """A record's number (``value[index]`` for an interval bound) as a float, NaN where it is ``None``."""
    if value is not None and index is not None:
        value = value[index]
    return np.nan if value is None else float(value)


def by_protocol(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frame's rows grouped by ``protocol``, the group with the most series first (native first on a tie):
    a comparison is made within one group, never across."""
    groups = {name: rows for name, rows in frame.groupby("protocol", sort=False)}
    return dict(sorted(groups.items(), key=lambda kv: (-kv[1]["series"].nunique(), kv[0] != NATIVE, kv[0])))


def distinct(values: pd.Series) -> str:
    """A column's distinct values in order of appearance, joined by " | " (one value: as it is)."""
    return " | ".join(dict.fromkeys(str(v) for v in values))


def protocol_table(frame: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per series, how its numbers were made: image size, evaluation resolution (the protocol), the
    networks' precision, test images per category and the interval method."""
    table = frame.groupby("series").agg(image_size=("image_size", distinct), evaluated_at=("protocol", distinct),
                                        precision=("precision", distinct), test_images=("n_test", distinct),
                                        categories=("category", "nunique"))
    return table.reindex([s for s in order if s in table.index])


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


@dataclass
class Quality:
    """The quality table: values and their 95 % interval bounds, three frames of one shape.

    Rows: series; columns: (metric, category) for every category, then (metric, ``"mean"``).
    """

    value: pd.DataFrame
    low: pd.DataFrame
    high: pd.DataFrame

    def estimate(self, series_name: str, metric: str, category: str = "mean") -> Estimate:
        column = (metric, category)
        return Estimate(*(float(t.loc[series_name, column]) for t in (self.value, self.low, self.high)))

    def estimates(self, metric: str, category: str = "mean") -> dict[str, Estimate]:
        """Every series' estimate of one column (``metric`` by its table name, e.g. ``"AUPRO"``)."""
        return {name: self.estimate(name, metric, category) for name in self.value.index}


def quality_table(frame: pd.DataFrame, order: Sequence[str]) -> Quality:
    """The ``Quality`` of the series in ``order`` on every category of ``frame``, with the mean over them."""
    categories = sorted(frame["category"].unique())
    columns = pd.MultiIndex.from_product([list(METRIC_NAMES.values()), [*categories, "mean"]])
    tables = {part: pd.DataFrame(np.nan, index=pd.Index(list(order), name="series"), columns=columns)
              for part in ("value", "low", "high")}
    for row in frame.itertuples(index=False):
        if row.series in tables["value"].index:
            for key, name in METRIC_NAMES.items():
                tables["value"].loc[row.series, (name, row.category)] = getattr(row, key)
                tables["low"].loc[row.series, (name, row.category)] = getattr(row, f"{key}_low")
                tables["high"].loc[row.series, (name, row.category)] = getattr(row, f"{key}_high")
    for key, name in METRIC_NAMES.items():
        for s in tables["value"].index:
            rows = frame[frame.series == s].set_index("category").reindex(categories)
            mean = (mean_estimate(rows[key], rows[f"{key}_se"]) if rows[key].notna().all()
                    else Estimate(float("nan")))
            for part in ("value", "low", "high"):
                tables[part].loc[s, (name, "mean")] = getattr(mean, part)
    return Quality(**tables)


def cost_table(frame: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Per series: parameters, mean training seconds per category, mean inference images/s, the
    largest peak memory, the image size(s), the weights that ran and the device(s)."""
    cost = frame.groupby("series").agg(
        params_M=("n_params", lambda s: s.max() / 1e6), train_s_per_category=("train_seconds", "mean"),
        infer_images_per_s=("infer_images_per_s", "mean"), peak_memory_MB=("peak_memory_mb", "max"),
        image_size=("image_size", distinct), weights=("weights", distinct), device=("device", distinct),
        categories=("category", "nunique"))
    return cost.reindex(list(order))


def style_quality(quality: Quality) -> Styler:
    """Each cell ``value [low, high]``, "—" where there is no number; in each column the best value and those
    tied with it (``compare``) in bold."""
    text = pd.DataFrame({column: [str(quality.estimate(s, *column)) for s in quality.value.index]
                         for column in quality.value.columns}, index=quality.value.index)
    text.columns = quality.value.columns
    bold = pd.DataFrame("", index=text.index, columns=text.columns)
    for column in quality.value.columns:
        column_estimates = {s: quality.estimate(s, *column) for s in quality.value.index}
        if any(np.isfinite(e.value) for e in column_estimates.values()):
            top, tied = best(column_estimates)
            for s in (top, *tied):
                bold.loc[s, column] = "font-weight: bold"
    return text.style.apply(lambda _: bold, axis=None)


def style_cost(table: pd.DataFrame) -> Styler:
    return table.style.format({"params_M": "{:.2f}", "train_s_per_category": "{:.1f}", "infer_images_per_s": "{:.1f}",
                               "peak_memory_MB": "{:.0f}"}, na_rep="—")


def headline_metric(quality: Quality) -> str:
    """AUPRO when any series has a mean AUPRO (the data has masks), else image AUROC."""
    return "AUPRO" if quality.value[("AUPRO", "mean")].notna().any() else "I-AUROC"


def quality_bars(quality: Quality) -> Figure:
    """One panel per metric: a bar per series and category, its 95 % interval as an error bar."""
    values = quality.value
    categories = [c for c in values.columns.get_level_values(1).unique() if c != "mean"]
    fig, axes = plt.subplots(1, len(METRIC_NAMES), figsize=(12, 3.2))
    width = 0.8 / max(len(values.index), 1)
    x = np.arange(len(categories))
    for ax, metric in zip(axes, METRIC_NAMES.values()):
        for i, name in enumerate(values.index):
            y = np.array([values.loc[name, (metric, c)] for c in categories], dtype=float)
            low = np.array([quality.low.loc[name, (metric, c)] for c in categories], dtype=float)
            high = np.array([quality.high.loc[name, (metric, c)] for c in categories], dtype=float)
            error = np.nan_to_num(np.stack([y - low, high - y]), nan=0.0)
            ax.bar(x + i * width, y, width, yerr=error, error_kw={"elinewidth": 0.8, "capsize": 1.5}, label=name)
        ax.set_xticks(x + width * (len(values.index) - 1) / 2, categories, fontsize=8)
        ax.set_title(metric)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def quality_vs_speed(cost: pd.DataFrame, quality: Quality, *, metric: str = "AUPRO", title: str = "") -> Figure:
    """Mean ``metric`` (with its 95 % interval as a vertical bar) against inference images/s (log scale),
    marker area growing with the parameters; the references (``adnb.methods.references()``) also as dashed
    lines across: the levels a method has to clear."""
    from adnb.methods import references

    floors = references()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in cost.index:
        x, mean = cost.loc[name, "infer_images_per_s"], quality.estimate(name, metric)
        y = mean.value
        if not np.isfinite(y):
            continue  # no mean: a category is missing
        reference = name.split("-")[0] in floors
        points = ax.scatter(x, y, s=30 + 8 * np.sqrt(cost.loc[name, "params_M"] * 100), alpha=0.7,
                            marker="s" if reference else "o", label=name)
        if np.isfinite(mean.low) and np.isfinite(mean.high):
            ax.vlines(x, mean.low, mean.high, color=points.get_facecolor()[0], lw=1.2)
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
