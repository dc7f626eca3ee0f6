"""Where model weights come from, and which device and dtype they run on.

The driver resolves every model once, before the pipeline starts
(`resolve_model` / `resolve_stage_models`): a hub id is downloaded a single
time with `huggingface_hub.snapshot_download` at a pinned revision and the
stages receive the local folder. Actors only ever load from local folders, so
a pool of N actors never races N downloads, and a missing model fails the run
before any video is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# Weight files any transformers checkpoint is saved as.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class ModelNotFoundError(FileNotFoundError):
    """A configured model has no usable weights where the config says."""


def _looks_like_local_path(model: str) -> bool:
    # Hub ids are "owner/name"; anything absolute, relative-dotted, home-based
    # or with more than one separator is meant as a folder.
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") != 1
        or os.path.exists(os.path.expanduser(model))
    )


def check_model_dir(path: str | os.PathLike[str]) -> str:
    """Return `path` if it holds a loadable checkpoint, else raise with the path in the message."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder does not exist: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"model folder has no config.json: {folder}")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelNotFoundError(f"model folder has no weight files ({', '.join(WEIGHT_PATTERNS)}): {folder}")
    return str(folder)


def resolve_model(
    model: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """Local folder for `model` (a folder or a hub id), downloading a hub id once.

    Call this on the driver. With `HF_HUB_OFFLINE=1` a hub id resolves only
    from the local cache. `revision` pins a branch, tag or commit so every
    run of a config gets the same weights.
    """
    if not model:
        raise ModelNotFoundError("no model configured (empty path or hub id)")
    if _looks_like_local_path(model):
        return check_model_dir(model)
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(
            repo_id=model,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except Exception as exc:  # noqa: BLE001 - every hub failure means "weights missing" to the user
        where = "in the local cache (HF_HUB_OFFLINE=1)" if offline else "on the hub or in the local cache"
        raise ModelNotFoundError(
            f"model {model!r} (revision {revision or 'default'}) not found {where}: {exc}"
        ) from exc
    return check_model_dir(local)


def resolve_stage_models(params: dict[str, Any]) -> dict[str, Any]:
    """Copy of a stage's constructor params with its model ids replaced by local folders.

    Handles `model` and a nested `enhance: {model: ...}` (captioning), each
    with its optional `revision`. Call on the driver before building actors.
    """
    out = dict(params)
    if out.get("model"):
        out["model"] = resolve_model(str(out["model"]), revision=out.get("revision"))
    enhance = out.get("enhance")
    if isinstance(enhance, dict) and enhance.get("model"):
        enhance = dict(enhance)
        enhance["model"] = resolve_model(str(enhance["model"]), revision=enhance.get("revision"))
        out["enhance"] = enhance
    return out


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pick_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """bf16 on GPUs that support it (fp16 otherwise), fp32 on CPU."""
    if dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def local_model_dir(model: str, revision: str | None = None) -> str:
    """What an actor loads from: the folder the driver resolved.

    Actors accept a hub id too (for direct use outside the pipeline), but
    only from the local cache: they never download.
    """
    if _looks_like_local_path(model):
        return check_model_dir(model)
    from huggingface_hub import snapshot_download

    try:
        return check_model_dir(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except ModelNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(
            f"model {model!r} is not in the local cache; resolve it on the driver first "
            f"(udfs.models.loading.resolve_model): {exc}"
        ) from exc
