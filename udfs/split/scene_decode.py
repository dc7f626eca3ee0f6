"""Whole-video decode to tiny RGB frames for scene detectors.

Scene detectors look at every frame but only at thumbnail size (TransNetV2
was trained on 48x27), so the resize happens inside swscale on the decoded
YUV planes (CPU) or on the GPU right after NVDEC (PyNvVideoCodec); full-size
RGB frames are never materialised on the host.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from udfs.media.video import DEFAULT_DECODE_THREADS, iter_frames, open_video, video_stream

log = logging.getLogger(__name__)

# swscale filters by name. AREA averages the source pixels under each
# target pixel: as fast as bilinear at these ratios and free of aliasing.
INTERPOLATIONS = ("AREA", "FAST_BILINEAR", "BILINEAR", "BICUBIC")


def decode_small_cpu(
    uri: str,
    width: int = 48,
    height: int = 27,
    *,
    threads: int = DEFAULT_DECODE_THREADS,
    interpolation: str = "AREA",
    max_frames: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """Every frame of `uri` as (N, height, width, 3) uint8 RGB, via PyAV."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    chunks: list[np.ndarray] = []
    # Frames land in preallocated chunks: one np.stack over ~100k tiny
    # arrays at the end would double peak memory for long videos.
    chunk = np.empty((1024, height, width, 3), dtype=np.uint8)
    filled = 0
    with open_video(uri, storage_options) as container:
        stream = video_stream(container, threads)
        for index, frame in iter_frames(container, stream):
            if max_frames is not None and index >= max_frames:
                break
            chunk[filled] = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation)
            filled += 1
            if filled == len(chunk):
                chunks.append(chunk)
                chunk = np.empty_like(chunk)
                filled = 0
    chunks.append(chunk[:filled])
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0].copy()


def decode_small_gpu(uri: str, width: int = 48, height: int = 27, *, gpu_id: int = 0, batch: int = 256) -> Any:
    """Every frame as a (N, height, width, 3) uint8 CUDA tensor: NVDEC decode
    (PyNvVideoCodec), RGB conversion and area resize on the GPU.

    Raises on anything NVDEC cannot handle (codec, container, remote URI);
    callers fall back to `decode_small_cpu`.
    """
    import PyNvVideoCodec as nvc  # lazy: GPU-only dependency
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda", gpu_id)
    decoder = nvc.SimpleDecoder(
        uri, gpu_id=gpu_id, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB
    )
    parts: list[torch.Tensor] = []
    while True:
        frames = decoder.get_batch_frames(batch)
        if not frames:
            break
        # Interleaved RGB frames expose the CUDA array interface: (H, W, 3).
        rgb = torch.stack([torch.from_dlpack(f) for f in frames]).to(device)
        x = rgb.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(height, width), mode="area")
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    if not parts:
        return torch.zeros((0, height, width, 3), dtype=torch.uint8, device=device)
    return torch.cat(parts)


def decode_small(uri: str, width: int = 48, height: int = 27, *, use_gpu: bool = False, **cpu_kwargs: Any) -> Any:
    """GPU decode when asked and possible, else PyAV. Returns a torch uint8
    tensor on the GPU, or a numpy array from the CPU path."""
    if use_gpu:
        try:
            return decode_small_gpu(uri, width, height)
        except Exception as exc:  # any NVDEC/driver/container failure -> CPU
            log.warning("GPU decode of %s failed (%s: %s); decoding on CPU", uri, type(exc).__name__, exc)
    return decode_small_cpu(uri, width, height, **cpu_kwargs)
