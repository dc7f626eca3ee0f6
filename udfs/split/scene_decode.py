"""Decode to tiny RGB frames for scene detectors, in chunks.

Scene detectors look at every frame but only at thumbnail size (TransNetV2
was trained on 48x27), so the resize happens inside swscale on the decoded
YUV planes (CPU) or on the GPU right after NVDEC (PyNvVideoCodec); full-size
RGB frames are never materialised on the host.

The detectors consume `iter_small*`: chunks of `chunk_frames` frames, so a
video's frames are never all in memory at once (a 1-hour 30 fps source is
~0.75 GB at 64x36). `decode_small*` gathers every chunk, for tests and
benchmarks on short videos.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from udfs.media.video import DEFAULT_DECODE_THREADS, iter_frames, open_video, video_stream

log = logging.getLogger(__name__)

# swscale filters by name. AREA averages the source pixels under each
# target pixel: as fast as bilinear at these ratios and free of aliasing.
INTERPOLATIONS = ("AREA", "FAST_BILINEAR", "BILINEAR", "BICUBIC")


CHUNK_FRAMES = 512


def iter_small_cpu(
    uri: str,
    width: int = 48,
    height: int = 27,
    *,
    threads: int = DEFAULT_DECODE_THREADS,
    interpolation: str = "AREA",
    max_frames: int | None = None,
    skip_frames: int = 0,
    chunk_frames: int = CHUNK_FRAMES,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[np.ndarray]:
    """Every frame of `uri` (after the first `skip_frames`), via PyAV, as
    consecutive (n <= chunk_frames, height, width, 3) uint8 RGB chunks."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    # A fresh array per chunk: the consumer may keep a chunk (or a view of
    # it) while the next one is filled.
    chunk = np.empty((chunk_frames, height, width, 3), dtype=np.uint8)
    filled = 0
    with open_video(uri, storage_options) as container:
        stream = video_stream(container, threads)
        for index, frame in iter_frames(container, stream):
            if max_frames is not None and index >= max_frames:
                break
            if index < skip_frames:
                continue
            chunk[filled] = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation=interpolation)
            filled += 1
            if filled == chunk_frames:
                yield chunk
                chunk = np.empty_like(chunk)
                filled = 0
    if filled:
        yield chunk[:filled]


def decode_small_cpu(uri: str, width: int = 48, height: int = 27, **kwargs: Any) -> np.ndarray:
    """Every frame of `uri` as one (N, height, width, 3) uint8 RGB array, via PyAV."""
    chunks = list(iter_small_cpu(uri, width, height, **kwargs))
    if not chunks:
        return np.empty((0, height, width, 3), dtype=np.uint8)
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0].copy()


def iter_small_gpu(uri: str, width: int = 48, height: int = 27, *, gpu_id: int = 0,
                   chunk_frames: int = 256) -> Iterator[Any]:
    """Every frame as consecutive (n, height, width, 3) uint8 CUDA tensors:
    NVDEC decode (PyNvVideoCodec), RGB conversion and area resize on the GPU.

    Raises on anything NVDEC cannot handle (codec, container, remote URI);
    callers fall back to `iter_small_cpu`.
    """
    import PyNvVideoCodec as nvc  # lazy: GPU-only dependency
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda", gpu_id)
    decoder = nvc.SimpleDecoder(
        uri, gpu_id=gpu_id, use_device_memory=True, output_color_type=nvc.OutputColorType.RGB
    )
    while True:
        frames = decoder.get_batch_frames(chunk_frames)
        if not frames:
            break
        # Interleaved RGB frames expose the CUDA array interface: (H, W, 3).
        rgb = torch.stack([torch.from_dlpack(f) for f in frames]).to(device)
        x = rgb.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(height, width), mode="area")
        yield x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_small_gpu(uri: str, width: int = 48, height: int = 27, *, gpu_id: int = 0, batch: int = 256) -> Any:
    """Every frame as one (N, height, width, 3) uint8 CUDA tensor (see `iter_small_gpu`)."""
    import torch

    parts = list(iter_small_gpu(uri, width, height, gpu_id=gpu_id, chunk_frames=batch))
    if not parts:
        return torch.zeros((0, height, width, 3), dtype=torch.uint8, device=torch.device("cuda", gpu_id))
    return torch.cat(parts)


def iter_small(uri: str, width: int = 48, height: int = 27, *, use_gpu: bool = False,
               chunk_frames: int = CHUNK_FRAMES, **cpu_kwargs: Any) -> Iterator[Any]:
    """Chunks from the GPU decode when asked and possible (torch uint8 on the
    GPU), else from PyAV (numpy). A GPU failure part-way through goes on with
    PyAV from the first frame not yet yielded, so no frame is lost or repeated."""
    done = 0
    if use_gpu:
        try:
            for part in iter_small_gpu(uri, width, height, chunk_frames=chunk_frames):
                yield part
                done += int(part.shape[0])
            return
        except Exception as exc:  # any NVDEC/driver/container failure -> CPU
            log.warning("GPU decode of %s failed after %d frames (%s: %s); decoding on CPU", uri, done,
                        type(exc).__name__, exc)
    yield from iter_small_cpu(uri, width, height, skip_frames=done, chunk_frames=chunk_frames, **cpu_kwargs)
