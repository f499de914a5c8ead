"""Machinery shared by every chapter: devices, seeds, paths, caches, records, progress, the runner."""

from adnb.runtime.device import get_device
from adnb.runtime.errors import AdnbError
from adnb.runtime.seed import seed_everything

__all__ = ["AdnbError", "get_device", "seed_everything"]
