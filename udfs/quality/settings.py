"""The `quality` config node, checked once: which signals are on, how each
samples a clip, and the text model every worker loads.

Every value comes from the config (conf/quality/default.yaml): nothing here
is a default of its own.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from udfs.schema import CLIP_QUALITY_FIELDS

BLOCKS = tuple(CLIP_QUALITY_FIELDS)
CAMERA_MOTIONS = ("static", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "complex")
DEVICES = ("auto", "cpu", "cuda")
# The package and file of the default text model (PP-OCRv4 detection, Apache-2.0).
TEXT_MODEL_PACKAGE = "rapidocr_onnxruntime"
TEXT_MODEL_FILE = os.path.join("models", "ch_PP-OCRv4_det_infer.onnx")


def enabled_blocks(node: Mapping[str, Any] | None) -> list[str]:
    """The blocks of a `quality` node that are on, in column order."""
    node = node or {}
    return [b for b in BLOCKS if isinstance(node.get(b), Mapping) and node[b].get("enabled")]


def any_enabled(node: Mapping[str, Any]) -> bool:
    return bool(enabled_blocks(node))


def quality_columns(node: Mapping[str, Any]) -> list[pa.Field]:
    return [f for block in enabled_blocks(node) for f in CLIP_QUALITY_FIELDS[block]]


def default_text_model() -> str:
    """Where the default text model lies, found without importing its package
    (whose import pulls OpenCV)."""
    spec = importlib.util.find_spec(TEXT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"quality.text.model is null, which means PP-OCRv4's text detector from the {TEXT_MODEL_PACKAGE} "
            "package, and that package is not installed: pip install rapidocr-onnxruntime, set "
            "quality.text.model to an .onnx file, or quality.text.enabled=false")
    return os.path.join(list(spec.submodule_search_locations)[0], TEXT_MODEL_FILE)


def _positive(block: str, node: Mapping[str, Any], key: str, *, allow_none: bool = False) -> None:
    value = node.get(key)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"quality.{block}.{key} must be a positive number, got {value!r}")


def prepare(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node checked, with the text model made an absolute path that
    exists; run on the driver, so a bad setting or a missing model file
    fails the run before any video is decoded."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in dict(node).items()}
    unknown = [k for k in out if k not in BLOCKS]
    if unknown:
        raise ValueError(f"quality: unknown blocks {unknown}; the blocks are {list(BLOCKS)}")
    for block in enabled_blocks(out):
        _positive(block, out[block], "fps", allow_none=block == "cuts")
        if "size" in out[block]:
            _positive(block, out[block], "size")
    if "text" in enabled_blocks(out):
        text = out["text"]
        _positive("text", text, "max_frames")
        if text.get("device") not in DEVICES:
            raise ValueError(f"quality.text.device must be one of {DEVICES}, got {text.get('device')!r}")
        path = text.get("model") or default_text_model()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"quality.text.model not found: {path!r}")
        text["model"] = os.path.abspath(path)
    if "camera" in enabled_blocks(out):
        reject = out["camera"].get("reject") or []
        bad = [r for r in reject if r not in CAMERA_MOTIONS]
        if bad:
            raise ValueError(f"quality.camera.reject: unknown values {bad}; choose from {list(CAMERA_MOTIONS)}")
    return out
