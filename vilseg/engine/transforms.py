"""A data transform the official ViL ADE20K recipe uses and mmseg lacks."""
from __future__ import annotations

from typing import Dict, Optional

import cv2
import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

__all__ = ["ColorJitter"]

# ITU-R 601 luma, in BGR order (mmseg loads images as BGR)
_GRAY_BGR = np.array([0.114, 0.587, 0.299], np.float32)


@TRANSFORMS.register_module()
class ColorJitter(BaseTransform):
    """Random brightness, contrast, saturation and hue, in a random order, as ``torchvision``'s ``ColorJitter``.

    mmseg's ``PhotoMetricDistortion`` draws other ranges (brightness as an additive delta, hue +-18 of 180); the
    official ViL segmentation recipe uses this jitter with brightness = contrast = saturation = 0.5, hue = 0.25.

    Factors are drawn uniformly: brightness, contrast, saturation from [max(0, 1 - x), 1 + x], the hue shift from
    [-hue, hue] turns of the colour wheel. Required key: ``img`` (H, W, 3) uint8 BGR; modified: ``img``.

    Args:
        brightness, contrast, saturation: jitter strength, >= 0 (0 disables).
        hue: hue jitter in [0, 0.5] (0 disables).
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
                 hue: float = 0.0) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"ColorJitter {name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"ColorJitter hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    @staticmethod
    def _factor(strength: float) -> Optional[float]:
        return float(np.random.uniform(max(0.0, 1.0 - strength), 1.0 + strength)) if strength > 0 else None

    def transform(self, results: Dict) -> Dict:
        img = results["img"]
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"ColorJitter expects an (H, W, 3) image, got shape {img.shape} "
                             f"({results.get('img_path', 'unknown file')})")
        out = img.astype(np.float32) / 255.0
        factors = [self._factor(self.brightness), self._factor(self.contrast), self._factor(self.saturation),
                   float(np.random.uniform(-self.hue, self.hue)) if self.hue > 0 else None]
        for op in np.random.permutation(4):
            f = factors[op]
            if f is None:
                continue
            if op == 0:
                out = np.clip(out * f, 0.0, 1.0)
            elif op == 1:
                mean = float((out @ _GRAY_BGR).mean())
                out = np.clip(out * f + mean * (1.0 - f), 0.0, 1.0)
            elif op == 2:
                gray = (out @ _GRAY_BGR)[..., None]
                out = np.clip(out * f + gray * (1.0 - f), 0.0, 1.0)
            else:
                hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)  # float input: hue in degrees [0, 360)
                hsv[..., 0] = np.mod(hsv[..., 0] + f * 360.0, 360.0)
                out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        results["img"] = np.clip(np.rint(out * 255.0), 0, 255).astype(img.dtype)
        return results

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue})")
