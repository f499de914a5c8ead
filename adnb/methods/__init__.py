"""One module per method, imported on demand (a chapter pays only for its own method's imports).

The book's four methods, ``fair``, ``pyramidflow``, ``d3ad`` and ``realnet``, and two references:
``baseline`` (a per-pixel z-score; its parameters are the data chapter's) and ``knn`` (feature kNN on
ImageNet features; the benchmark chapter's). ``adnb.recipe.Recipe`` runs any of them the same way.

``load_detector`` and ``adnb.recipe`` import ``adnb.methods.<name>`` when they first need it;
importing the module registers its detector.
"""

from adnb.methods.base import Detector, Prediction, load_detector

METHODS = ("baseline", "knn", "fair", "pyramidflow", "d3ad", "realnet")

__all__ = ["METHODS", "Detector", "Prediction", "load_detector"]
