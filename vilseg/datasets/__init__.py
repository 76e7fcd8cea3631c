"""vilseg datasets. Importing this package registers ``CheckedADE20KDataset`` (mmseg's ADE20KDataset with file
checks that fail with one clear error naming the file) in mmseg's ``DATASETS`` and ``ColorJitter`` in its
``TRANSFORMS``."""
from .mini_ade import MINI_ADE_CLASSES, MiniADESpec, generate_mini_ade, mini_ade_exists, render_scene
from .transforms import ColorJitter
from .validation import (CheckedADE20KDataset, DatasetValidationError, InvalidDataError, MissingDataError,
                         check_annotation_file, check_image_file, check_sample, read_image_size)

__all__ = [
    "ColorJitter", "MINI_ADE_CLASSES", "MiniADESpec", "generate_mini_ade", "mini_ade_exists", "render_scene",
    "CheckedADE20KDataset", "DatasetValidationError", "InvalidDataError", "MissingDataError",
    "check_annotation_file", "check_image_file", "check_sample", "read_image_size",
]
