"""Which methods adnb knows: each declares itself, once, in its own module.

A method module ends with one declaration, e.g. ``adnb.methods.fair``::

    METHOD = register(MethodSpec("fair", FAIR, fit, training=FairTraining))

and every part of the package reads that declaration and nothing else: the recipe (config,
``prepare``, ``fit``), ``bench`` (``training``: the step ``fit`` repeats, which it times),
``train-all`` (every registered method and its variants), the benchmark chapter (one row per
method, the references first) and the runner (the chapter's notebook and preset files).

Methods come from three places:

- the modules of this package, ``adnb/methods/<name>.py`` (the book's methods and references);
- installed packages that name a module (or a ``MethodSpec``) in the entry-point group
  ``adnb.methods`` of their metadata: a third party's method, which every process with the package
  installed finds (a chapter's kernel, ``train-all``'s workers, every node of a Ray cluster)::

      [project.entry-points."adnb.methods"]
      tiny = "tiny_method"            # the module that calls register(MethodSpec("tiny", ...))

- ``register(spec)`` at run time (a notebook trying a method out: only that process knows it).

A method's own module is imported only when the method is first asked for (``spec("fair")``), so
a chapter pays for its method's imports alone; ``names()`` imports them all.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adnb.runtime.errors import AdnbError

ENTRY_POINT_GROUP = "adnb.methods"
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")  # a record's series is "<method>-<variant>": no "-" in a name


@dataclass(frozen=True)
class MethodSpec:
    """Everything adnb needs to know about one method (see the module docstring)."""

    name: str  # what the commands call it (lower case, letters, digits and "_")
    detector: type  # its ``Detector`` subclass; ``detector.config_class`` is its config
    fit: Callable[..., Any]  # fit(config, images, *, device, cache, force_train, **prepared.extras) -> Detector
    # training(config, images, *, device) -> adnb.runtime.training.Training: the set-up and step ``fit``
    # loops over, which ``bench`` times (None: nothing iterative to time, e.g. a memory bank)
    training: Callable[..., Any] | None = None
    chapter: str = ""  # the chapter whose notebook and presets hold its parameters ("": its own, named as it is)
    notebook: Path | None = None  # that chapter's notebook, when it is not one of the book's (notebooks/)
    presets: Path | None = None  # the folder of that chapter's preset files (<preset>/<chapter>.yaml), if not adnb's
    reference: bool = False  # a reference row of the benchmark (a level the methods have to clear)
    resolve: Callable[..., Any] | None = None  # resolve(params, category) -> config, its "auto" choices made
    # prepare(config, params, category, *, device, force_train, plan) -> Prepared: what fit needs besides the
    # images; with plan=True it makes nothing and only names its key and cache entries (see adnb.recipe)
    prepare: Callable[..., Any] | None = None
    variant: Callable[[Any], str] | None = None  # variant(config) -> name of a configuration that is its own row

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise AdnbError(f"method name {self.name!r}: use lower-case letters, digits and '_' (no '-': it "
                            "separates a method from its variant in the benchmark's rows)")
        if getattr(self.detector, "method", None) != self.name:
            raise AdnbError(f"method {self.name!r}: its detector class {self.detector.__name__} says method = "
                            f"{getattr(self.detector, 'method', None)!r}; the two must agree (records carry it)")
        if (self.notebook is None) != (self.presets is None):
            raise AdnbError(f"method {self.name!r}: give both notebook and presets (a chapter of its own outside "
                            "the book) or neither")

    @property
    def config_class(self) -> type:
        return self.detector.config_class

    @property
    def chapter_name(self) -> str:
        return self.chapter or self.name

    def chapter_notebook(self) -> Path:
        """The source notebook of the method's chapter."""
        from adnb.runtime.runner import find_notebook

        return self.notebook if self.notebook is not None else find_notebook(self.chapter_name)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known under its name (a module re-imported replaces its own declaration)."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known.detector.__module__ != spec.detector.__module__:
        raise AdnbError(f"method {spec.name!r} is declared twice: by {known.detector.__module__} and by "
                        f"{spec.detector.__module__}; rename one")
    _REGISTRY[spec.name] = spec
    return spec


def spec(name: str) -> MethodSpec:
    """The declaration of method ``name``: a module of this package, then an installed entry point."""
    if name not in _REGISTRY and NAME_PATTERN.fullmatch(name):
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            importlib.import_module(f"{__package__}.{name}")
        for entry in _entry_points():
            if entry.name == name and name not in _REGISTRY:
                _load(entry)
    if name not in _REGISTRY:
        raise AdnbError(f"unknown method {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every method adnb knows, in the book's order: the references, then the methods, each group in
    the reading order of their chapters (the numbers of the notebooks' names)."""
    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    for entry in _entry_points():
        if entry.name not in _REGISTRY:
            _load(entry)
    return sorted(_REGISTRY, key=lambda name: _order(_REGISTRY[name]))


def references() -> list[str]:
    """The reference rows (``MethodSpec.reference``), in the book's order."""
    return [name for name in names() if _REGISTRY[name].reference]


def _order(spec: MethodSpec) -> tuple[bool, str, str]:
    try:
        chapter = spec.chapter_notebook().stem
    except AdnbError:  # no notebook found: after the others
        chapter = "~"
    return not spec.reference, chapter, spec.name


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load(entry: importlib.metadata.EntryPoint) -> None:
    """Import an entry point's module; an entry point that names a ``MethodSpec`` object is registered."""
    where = f"entry point {entry.name} = {entry.value} (group {ENTRY_POINT_GROUP}" + \
            (f", package {entry.dist.name})" if entry.dist else ")")
    try:
        loaded = entry.load()
    except Exception as exc:
        raise AdnbError(f"the method of {where} does not import: {type(exc).__name__}: {exc}; fix that package or "
                        "uninstall it") from exc
    if isinstance(loaded, MethodSpec):
        register(loaded)
    if entry.name not in _REGISTRY:
        raise AdnbError(f"{where} declares no method named {entry.name!r}: its module must call "
                        f"register(MethodSpec({entry.name!r}, ...)), or the entry point name its MethodSpec")
