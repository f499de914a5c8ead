"""One module per method, imported on demand (a chapter pays only for its own method's imports).

``load_detector`` and ``adnb.pipeline`` import ``adnb.methods.<name>`` when they first need it;
importing the module registers its detector.
"""

from adnb.methods.base import Detector, Prediction, load_detector

METHODS = ("baseline", "fair", "pyramidflow", "d3ad", "realnet")

__all__ = ["METHODS", "Detector", "Prediction", "load_detector"]
