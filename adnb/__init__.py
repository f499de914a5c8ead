"""adnb — the package behind the executable book on industrial visual anomaly detection.

Data flows one way: ``adnb.data`` loads images, ``adnb.synthesis`` corrupts them for training,
``adnb.methods.<name>`` fits a detector and scores images, ``adnb.metrics`` turns the scores into
numbers, and ``adnb.runtime`` keeps the machinery (devices, caches, records, the notebook runner).
"""

__version__ = "0.1.0"
