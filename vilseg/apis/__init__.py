"""High-level entry points behind the tools: config loading from any directory, training / testing through
mmengine's Runner, inference with mmseg's ``init_model`` / ``inference_model``, and the ADE20K CPU demo."""
from .config import adapt_to_device, build_backbone, load_config, resolve_data_roots, resolve_path
from .inference import collect_images, colorize, infer_images, init_segmentor, overlay, predict_labels
from .train import build_runner, close_distributed, test, train

# what a tool reports as one line "error: ..." with exit code 2 (a bad file or argument, a refused checkpoint)
# instead of a traceback
from vilseg.engine import DatasetValidationError  # noqa: E402
from vilseg.utils.checkpoint import CheckpointMismatchError, UnsafeCheckpointError  # noqa: E402

from .config import ConfigKeyError  # noqa: E402

USER_ERRORS = (FileNotFoundError, DatasetValidationError, UnsafeCheckpointError, CheckpointMismatchError,
               ConfigKeyError)

__all__ = [
    "adapt_to_device", "build_backbone", "load_config", "resolve_data_roots", "resolve_path",
    "collect_images", "colorize", "infer_images", "init_segmentor", "overlay", "predict_labels",
    "build_runner", "close_distributed", "test", "train", "USER_ERRORS",
]
