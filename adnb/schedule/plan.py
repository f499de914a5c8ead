"""Planning ``train-all``: one job per (method, category), each marked done or not, nothing trained.

One job per (method, category), and one per named variant a chapter trains beside its main model
(``Recipe.variants``). This machine asks the recipe which cache entry a job trains into
(``Recipe.cache_entry``) and skips the jobs whose entry exists. A method's ``prepare`` may make
something several jobs share (RealNet's SDAS model serves a whole dataset): asked to plan only
(``plan=True``), it names its key and its cache entries and makes nothing, so a job whose
preparation is missing is known here, and the jobs missing the same entry share it — the first
of them makes it and the others wait for it (``adnb.schedule.driver``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adnb.runtime.errors import AdnbError
from adnb.schedule.transfer import relative


@dataclass(frozen=True)
class Job:
    """One method at one preset on one category: what one worker trains."""

    method: str
    preset: str
    category: str
    dataset: str = "embedded"  # for messages and log names only
    data_root: str = ""  # "" is the embedded dataset, which every worker generates for itself
    overrides: tuple[tuple[str, Any], ...] = ()  # the parameters changed from the preset (hashable)
    variant: str = ""  # a named variant the method's chapter trains too (``Recipe.variants``)

    @property
    def label(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method

    @property
    def name(self) -> str:
        return f"{self.label} on {self.dataset}/{self.category}"

    def recipe(self, device: str = "auto") -> Any:
        from adnb.recipe import Recipe

        recipe = Recipe.from_preset(self.method, self.preset, dict(self.overrides), device=device)
        return recipe.variants()[self.variant] if self.variant else recipe

    def open(self, recipe: Any) -> Any:
        """The job's category, opened as a chapter opens it (so the cache key is the chapter's)."""
        from adnb.runtime.notebook import open_categories

        [category] = open_categories(self.data_root, self.category, recipe.params.get("mask_suffix") or None)
        return category


@dataclass
class Planned:
    """A job and what this machine knows about it before it runs."""

    job: Job
    entry: str = ""  # the detector's cache entry, relative to the cache root
    trained: bool = False  # that entry exists here: nothing to do
    needs: list[str] = field(default_factory=list)  # preparation entries (relative) the worker must have
    shares: str = ""  # a missing preparation entry: the first job that misses it makes it, the others wait
    error: str = ""  # planning failed: the job does not run


def overrides_for(method: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that apply to ``method``: ``KEY`` to every method whose chapter has it, ``METHOD.KEY``
    to one (an error naming the valid keys if its chapter lacks ``KEY``; ``plan`` refuses a ``KEY`` no
    method has)."""
    from adnb.methods import names
    from adnb.recipe import parameter_names

    general, scoped = {}, {}
    for key, value in overrides.items():
        scope, dot, name = key.partition(".")
        if not dot:
            if key in parameter_names(method):
                general[key] = value
        elif scope not in names():
            raise AdnbError(f"override {key!r}: {scope!r} is not a method; write KEY or METHOD.KEY "
                            f"(methods: {', '.join(names())})")
        elif scope == method:
            scoped[name] = value
    return {**general, **scoped}  # METHOD.KEY wins over KEY, whatever their order


def check_request(methods: Sequence[str], preset: str) -> None:
    """One clear error for an unknown method or preset, before anything is opened or trained."""
    from adnb.methods import names
    from adnb.runtime.presets import list_presets

    unknown = [m for m in methods if m not in names()]
    if unknown:
        raise AdnbError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(names())}")
    if preset not in list_presets():
        raise AdnbError(f"unknown preset {preset!r}; valid presets: {', '.join(list_presets())}")


def _check_general_keys(methods: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """An error for an unscoped ``KEY`` that no method of ``methods`` has (a typo applies nowhere)."""
    from adnb.recipe import parameter_names

    valid = {method: parameter_names(method) for method in methods}
    unknown = [key for key in overrides if "." not in key and not any(key in names for names in valid.values())]
    if unknown:
        raise AdnbError(f"unknown parameter(s) {', '.join(unknown)} for {', '.join(methods)}; valid: "
                        + "; ".join(f"{method}: {', '.join(names)}" for method, names in valid.items()))


def plan(methods: Sequence[str], preset: str, *, data_root: str = "", categories: Sequence[str] | None = None,
         overrides: Mapping[str, Any] | None = None) -> list[Planned]:
    """One planned job per (method, category) and per named variant of the method's chapter
    (``Recipe.variants``), in that order, each marked trained or not (see the module docstring)."""
    from adnb.runtime.notebook import open_categories

    check_request(methods, preset)
    _check_general_keys(methods, overrides or {})
    # Absolute, since a worker runs elsewhere (Ray's workers in a folder of their own); not resolved, since
    # the dataset's name (part of the cache key) is its folder's name as given.
    data_root = os.path.abspath(os.path.expanduser(data_root)) if data_root else ""
    planned = []
    for method in methods:
        changes = overrides_for(method, overrides or {})
        recipe = Job(method, preset, "", overrides=tuple(changes.items())).recipe(device="cpu")
        every = open_categories(data_root, "", recipe.params.get("mask_suffix") or None)
        names = [c.name for c in every]
        missing = [name for name in categories or () if name not in names]
        if missing:
            raise AdnbError(f"no category {', '.join(missing)} in {data_root or 'the embedded dataset'}; "
                            f"categories: {', '.join(names)}")
        versions = [("", recipe), *recipe.variants().items()]  # the chapter's named variants are jobs too
        for category in every:
            if categories and category.name not in categories:
                continue
            for variant, version in versions:
                job = Job(method, preset, category.name, category.dataset, data_root, tuple(changes.items()), variant)
                planned.append(probe(job, version, category))
    return planned


def probe(job: Job, recipe: Any, category: Any) -> Planned:
    """Which cache entry ``job`` trains into, whether it is there, and which preparation entries it needs
    (made or missing): the recipe asked to plan only, so nothing is trained."""
    try:
        config = recipe.config(category)
        prepared = recipe.prepare(config, category, plan=True)
        entry = recipe.cache_entry(category, config=config, prepared=prepared)
    except Exception as exc:  # one job that cannot be planned must not stop the others
        return Planned(job, error=f"{type(exc).__name__}: {exc}")
    made = [relative(e.folder) for e in prepared.entries if e.exists()]
    missing = [relative(e.folder) for e in prepared.entries if not e.exists()]
    return Planned(job, relative(entry.folder), entry.exists(), made, missing[0] if missing else "")
