"""Frames -> Qwen2-VL / Qwen2.5-VL video inputs, without torchvision.

transformers' Qwen2-VL video processor needs torchvision, which the CPU
environment does not ship (and which would pin another torch build). The
transform is small and fixed by the model family: resize every frame to a
multiple of patch*merge pixels within the checkpoint's pixel budget, scale
and normalise, then cut (temporal_patch x patch x patch) patches in the
merge-window order the vision tower expects. This module does exactly that
from the checkpoint's own preprocessor config, so the same code path runs on
CPU and GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Defaults of Qwen2-VL's processors, used when a config omits a key.
_DEFAULTS = {
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "min_pixels": 4 * 28 * 28,
    "max_pixels": 768 * 28 * 28,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Nearest (h, w) divisible by `factor` with h*w within [min_pixels, max_pixels],
    keeping the aspect ratio (Qwen2-VL's rule)."""
    if max(height, width) / max(min(height, width), 1) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVideoPatcher:
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, model_dir: str, max_pixels: int | None = None) -> "QwenVideoPatcher":
        """Read the checkpoint's video (else image) preprocessor config."""
        cfg: dict = {}
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            path = Path(model_dir) / name
            if path.is_file():
                cfg = json.loads(path.read_text())
                break
        size = cfg.get("size") or {}
        values = dict(_DEFAULTS)
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        values["min_pixels"] = cfg.get("min_pixels") or size.get("shortest_edge") or _DEFAULTS["min_pixels"]
        values["max_pixels"] = cfg.get("max_pixels") or size.get("longest_edge") or _DEFAULTS["max_pixels"]
        if max_pixels is not None:
            values["max_pixels"] = max_pixels
        values["image_mean"] = tuple(values["image_mean"])
        values["image_std"] = tuple(values["image_std"])
        return cls(**values)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """(T, H, W, 3) uint8 -> (patches (N, C*tp*p*p) float32, grid (t, h, w))."""
        if frames.ndim != 4 or len(frames) == 0:
            raise ValueError(f"expected (T, H, W, 3) frames, got {frames.shape}")
        h, w = frames.shape[1:3]
        rh, rw = smart_resize(h, w, self.factor, self.min_pixels, self.max_pixels)
        if (rh, rw) != (h, w):
            frames = np.stack([np.asarray(Image.fromarray(f).resize((rw, rh), Image.BICUBIC)) for f in frames])
        x = frames.astype(np.float32) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        x = x.transpose(0, 3, 1, 2)  # T, C, H, W
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -len(x) % tp:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        t, c = len(x), x.shape[1]
        gt, gh, gw = t // tp, rh // p, rw // p
        x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        # (gt, gh/m, gw/m, m, m, C, tp, p, p): merge windows contiguous, as the vision tower reads them.
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)

    def num_tokens(self, grid: tuple[int, int, int]) -> int:
        return grid[0] * grid[1] * grid[2] // (self.merge_size**2)
