"""One module per method. Importing this package registers every detector for ``load_detector``."""

import importlib
import importlib.util

from adnb.methods.base import Detector, Prediction, load_detector

METHODS = ("baseline", "fair", "pyramidflow", "d3ad", "realnet")
for _name in METHODS:
    if importlib.util.find_spec(f"adnb.methods.{_name}") is not None:
        importlib.import_module(f"adnb.methods.{_name}")

__all__ = ["METHODS", "Detector", "Prediction", "load_detector"]
