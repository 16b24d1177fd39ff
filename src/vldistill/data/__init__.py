"""Data: image-caption pairs from manifests and Hugging Face datasets, and the bundled easy-VQA set."""

from vldistill.data.easyvqa import (
    CLASSNAMES,
    COLORS_ZH,
    SHAPES_ZH,
    TEMPLATES,
    BundledData,
    ZeroShotSet,
    load_easyvqa,
)
from vldistill.data.pairs import (
    DataError,
    PairDataset,
    Sample,
    caption_groups,
    collate_raw,
    decode_image,
    load_hf_dataset,
    load_manifest,
)
from vldistill.data.sources import DATASETS, LabelledData, load_data

__all__ = [
    "CLASSNAMES",
    "COLORS_ZH",
    "DATASETS",
    "SHAPES_ZH",
    "TEMPLATES",
    "BundledData",
    "DataError",
    "LabelledData",
    "PairDataset",
    "Sample",
    "ZeroShotSet",
    "caption_groups",
    "collate_raw",
    "decode_image",
    "load_data",
    "load_easyvqa",
    "load_hf_dataset",
    "load_manifest",
]
