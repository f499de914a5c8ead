"""Datasets: the MVTec-layout loader, the embedded dataset, converters and the download helper."""

from adnb.data.embedded import default_dataset
from adnb.data.images import read_image, read_mask
from adnb.data.layout import Category, Sample, Split, list_categories, load_category

__all__ = ["Category", "Sample", "Split", "default_dataset", "list_categories", "load_category", "read_image", "read_mask"]
