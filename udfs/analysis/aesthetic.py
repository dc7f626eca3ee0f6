"""Aesthetic scoring: CLIP ViT-L/14 image embeddings through the LAION
improved-aesthetic-predictor MLP head.

Per frame: CLIP preprocessing (shorter side 224, centre crop 224, CLIP
mean/std), the projected image embedding, L2-normalised, then the head
(768 -> 1024 -> 128 -> 64 -> 16 -> 1, linear layers with dropouts between
and no activations, exactly the published layout so its state dict
`layers.{0,2,4,6,7}.{weight,bias}` loads as is). Per clip: min or mean over
its frames (1 fps by default, from the `aesthetic` frame columns that
ClipAnalysis fills). With a threshold, clips scoring below it get
passed=false.

Frames of all clips in a batch are scored together in model batches of
`model_batch_size` images. bf16 (or fp16) on a GPU, fp32 on CPU.

Input columns: `{consumer}_frames`, `{consumer}_frame_hw`, `error`.
Output: `aesthetic_score`, `passed`, `filter_reason`; the consumer's frame
columns are dropped (`drop_frames`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from udfs.schema import CLIP_AESTHETIC_FIELDS
from udfs.analysis.filtering import apply_filter, ensure_filter_columns, row_errors, set_errors
from udfs.media.frames import drop_frame_columns
from udfs.models.loading import local_model_dir, pick_device, pick_dtype
from udfs.media.video import unpack_frames

REDUCTIONS = ("min", "mean")


class AestheticHead(nn.Module):
    """The improved-aesthetic-predictor MLP (dropouts are inert at eval)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def load_head(path: str) -> AestheticHead:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"aesthetic head state dict not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    return head.eval()


def load_clip(model: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """CLIP vision tower + projection and its image processor, from a local
    folder or a hub id (a full CLIPModel checkpoint loads too)."""
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    model = local_model_dir(model)
    try:
        config = AutoConfig.from_pretrained(model)
        if config.model_type == "clip":
            # A full CLIPModel checkpoint: take its vision half. The projection
            # size lives on the top-level config; the nested one may be stale.
            vision_config = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        vision = CLIPVisionModelWithProjection.from_pretrained(model, config=config, dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(f"cannot load CLIP model {model!r}: {exc}") from exc
    try:
        processor = CLIPImageProcessor.from_pretrained(model)
    except OSError:
        processor = CLIPImageProcessor()  # the ViT-L/14 defaults
    return vision.to(device).eval(), processor


def pick_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    name = pick_device(device)
    return torch.device(name), pick_dtype(name, dtype)


class AestheticScorer:
    def __init__(
        self,
        *,
        model: str,
        head: str,
        threshold: float | None,
        reduction: str,
        consumer: str,
        model_batch_size: int,
        device: str,
        dtype: str,
        drop_frames: bool,
        revision: str | None,
    ) -> None:
        # `model` arrives resolved to a local folder at `revision` (the driver
        # downloads hub ids once); the revision is kept for provenance.
        self.revision = revision
        if reduction not in REDUCTIONS:
            raise ValueError(f"aesthetic.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.threshold = threshold
        self.reduction = reduction
        self.consumer = consumer
        self.model_batch_size = model_batch_size
        self.drop_frames = drop_frames
        self.device, self.dtype = pick_device_dtype(device, dtype)
        self.head = load_head(head).to(self.device)  # the head stays fp32: it is tiny
        self.vision, self.processor = load_clip(model, self.device, self.dtype)
        crop = self.processor.crop_size
        self.crop_hw = (int(crop["height"]), int(crop["width"]))
        self.mean = torch.tensor(self.processor.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.processor.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> normalised (N, 3, 224, 224) float32 pixels on the device."""
        if frames.shape[1:3] == self.crop_hw:
            # Already resized and centre-cropped at extraction: the processor's
            # resize/crop would be identities, so only rescale + normalise.
            # uint8 crosses to the device (4x less than float), then normalises there.
            x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255.0
            return (x - self.mean) / self.std
        return self.processor(images=list(frames), return_tensors="pt")["pixel_values"].to(self.device)

    @torch.inference_mode()
    def score_frames(self, frames: np.ndarray) -> np.ndarray:
        """Per-frame aesthetic scores of (N, H, W, 3) uint8 frames."""
        out = []
        for start in range(0, len(frames), self.model_batch_size):
            pixels = self.preprocess(frames[start : start + self.model_batch_size])
            embeds = self.vision(pixel_values=pixels.to(self.dtype)).image_embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            out.append(self.head(embeds).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        if f"{self.consumer}_frames" not in batch.column_names:
            raise ValueError(
                f"AestheticScorer needs the {self.consumer!r} frame columns: add a {self.consumer!r} consumer "
                "to frames.consumers (ClipAnalysis) before this stage"
            )
        errors = row_errors(batch)
        frames_col = batch.column(f"{self.consumer}_frames").to_pylist()
        hw_col = batch.column(f"{self.consumer}_frame_hw").to_pylist()
        owners: list[int] = []
        stacks: list[np.ndarray] = []
        for i in range(n):
            if errors[i] is not None or not frames_col[i]:
                continue
            stack = unpack_frames(frames_col[i], hw_col[i])
            stacks.append(stack)
            owners += [i] * len(stack)
        scores: list[float | None] = [None] * n
        failures: list[str | None] = [None] * n
        if stacks:
            # One image batch across clips; frames differing in size (no crop
            # configured) go through the processor per clip instead.
            same = len({s.shape[1:] for s in stacks}) == 1
            try:
                per_frame = (
                    self.score_frames(np.concatenate(stacks))
                    if same
                    else np.concatenate([self.score_frames(s) for s in stacks])
                )
            except (RuntimeError, ValueError) as exc:  # e.g. out of memory: the batch's rows, not the run
                for i in set(owners):
                    failures[i] = f"aesthetic scoring failed: {type(exc).__name__}: {exc}"
            else:
                owners_arr = np.asarray(owners)
                for i in set(owners):
                    values = per_frame[owners_arr == i]
                    scores[i] = float(values.min() if self.reduction == "min" else values.mean())
        if any(failures):
            batch = set_errors(batch, failures)
            errors = row_errors(batch)
        out = batch.append_column(CLIP_AESTHETIC_FIELDS[0], pa.array(scores, CLIP_AESTHETIC_FIELDS[0].type))
        reasons: list[str | None] = [None] * n
        if self.threshold is not None:
            for i, s in enumerate(scores):
                if s is not None and s < self.threshold:
                    reasons[i] = f"aesthetic: {self.reduction}={s:.4g}<{self.threshold:g}"
                elif s is None and errors[i] is None:
                    reasons[i] = "aesthetic: no frames to score"
        out = apply_filter(ensure_filter_columns(out), reasons)
        return drop_frame_columns(out, self.consumer) if self.drop_frames else out
