"""One module per method, each declaring itself with a ``MethodSpec`` (``adnb.methods.registry``).

The book's four methods, ``fair``, ``pyramidflow``, ``d3ad`` and ``realnet``, three references,
``baseline`` (a per-pixel z-score; its parameters are the data chapter's), ``patchcore`` and ``padim``
(on ImageNet features; the benchmark chapter's), and whatever else is declared here or by an
installed package: ``names()`` lists them all. ``adnb.recipe.Recipe`` runs any of them the same way.

A method's module is imported when the method is first asked for (``spec(name)``), so a chapter
pays only for its own method's imports.
"""

from adnb.methods.base import Detector, Prediction, load_detector
from adnb.methods.registry import MethodSpec, names, references, register, spec

__all__ = ["Detector", "MethodSpec", "Prediction", "load_detector", "names", "references", "register", "spec"]
