"""Data: image-caption pairs and task samples (VQA, entailment, multiple choice) from manifests and Hugging Face
datasets, the bundled easy-VQA set in each kind, and low-shot / domain-shift splits."""

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
from vldistill.data.sources import DATASETS, LabelledData, load_data, load_task_data
from vldistill.data.splits import SplitConfig, apply_split, domain_shift, low_shot
from vldistill.data.tasks import (
    ENTAILMENT_LABELS,
    TASK_KINDS,
    ChoiceSample,
    EntailmentSample,
    TaskDataset,
    TaskSample,
    VQASample,
    load_task_hf,
    load_task_manifest,
)

__all__ = [
    "CLASSNAMES",
    "COLORS_ZH",
    "DATASETS",
    "ENTAILMENT_LABELS",
    "SHAPES_ZH",
    "TASK_KINDS",
    "TEMPLATES",
    "BundledData",
    "ChoiceSample",
    "DataError",
    "EntailmentSample",
    "LabelledData",
    "PairDataset",
    "Sample",
    "SplitConfig",
    "TaskDataset",
    "TaskSample",
    "VQASample",
    "ZeroShotSet",
    "apply_split",
    "caption_groups",
    "collate_raw",
    "decode_image",
    "domain_shift",
    "load_data",
    "load_easyvqa",
    "load_hf_dataset",
    "load_manifest",
    "load_task_data",
    "load_task_hf",
    "load_task_manifest",
    "low_shot",
]
