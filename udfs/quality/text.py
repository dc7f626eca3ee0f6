"""Burned-in text: a DB text detector (PP-OCRv4's, in ONNX) over sampled frames.

The detector maps a frame to per-pixel text probabilities. As PaddleOCR's
DB post-processing does, pixels above `pixel_threshold` are joined into
regions (after a 2x2 dilation), a region counts when its mean probability
is at least `box_threshold`, and it is grown by `unclip_ratio` (offset =
area * ratio / perimeter) to cover its characters' full extent. The frame's
text area is the union of the grown regions' boxes over the frame's area;
the clip's is the largest over its frames.

onnxruntime runs it: the CUDA provider where `onnxruntime-gpu` sees a GPU
(`device: auto` or `cuda`), else the CPU. One session per process and model.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# PP-OCR's detection input normalisation (rapidocr's config): BGR, (x / 255 - 0.5) / 0.5.
_MEAN = 0.5
_STD = 0.5


def input_size(height: int, width: int, longer: int) -> tuple[int, int]:
    """(h, w) the detector sees: the longer side at `longer` (never upscaled
    past the frame), both rounded to multiples of 32, at least 32."""
    scale = min(1.0, longer / max(height, width))
    return (max(32, int(round(height * scale / 32)) * 32), max(32, int(round(width * scale / 32)) * 32))


def providers(device: str) -> list[str]:
    """onnxruntime providers for `device` (auto | cpu | cuda)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"quality.text.device=cuda, but onnxruntime offers only {available}: "
                           "install onnxruntime-gpu, or use device=auto")
    return ["CPUExecutionProvider"]


@functools.lru_cache(maxsize=4)
def _session(model: str, device: str, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=providers(device))


class TextDetector:
    """Text area of RGB frames with a DB detector."""

    def __init__(self, *, model: str, device: str, threads: int, pixel_threshold: float, box_threshold: float,
                 unclip_ratio: float) -> None:
        self.session = _session(model, device, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.pixel_threshold = float(pixel_threshold)
        self.box_threshold = float(box_threshold)
        self.unclip_ratio = float(unclip_ratio)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def probabilities(self, rgb: np.ndarray) -> np.ndarray:
        """(N, H, W) text probabilities of (N, H, W, 3) uint8 RGB frames (H, W multiples of 32)."""
        x = rgb[..., ::-1].astype(np.float32) * (1.0 / 255.0)
        x = ((x - _MEAN) / _STD).transpose(0, 3, 1, 2)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0][:, 0]

    def text_area(self, prob: np.ndarray) -> float:
        """Share of a probability map's area inside grown text regions."""
        from scipy import ndimage

        mask = ndimage.binary_dilation(prob > self.pixel_threshold, structure=np.ones((2, 2), bool))
        labels, count = ndimage.label(mask)
        if count == 0:
            return 0.0
        h, w = prob.shape
        covered = np.zeros((h, w), dtype=bool)
        means = ndimage.mean(prob, labels, index=np.arange(1, count + 1))
        for index, region in enumerate(ndimage.find_objects(labels)):
            if region is None or means[index] < self.box_threshold:
                continue
            ys, xs = region
            bh, bw = ys.stop - ys.start, xs.stop - xs.start
            if min(bh, bw) < 3:
                continue
            grow = int(round(bh * bw * self.unclip_ratio / (2.0 * (bh + bw))))
            covered[max(0, ys.start - grow):ys.stop + grow, max(0, xs.start - grow):xs.stop + grow] = True
        return float(covered.mean())

    def __call__(self, rgb: np.ndarray) -> float | None:
        """The largest text area over (N, H, W, 3) frames (None for none)."""
        if len(rgb) == 0:
            return None
        return max(self.text_area(p) for p in self.probabilities(rgb))
