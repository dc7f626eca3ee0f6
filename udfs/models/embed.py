"""Clip embeddings: one L2-normalised float32 vector per clip, plus text
queries embedded into the same space for retrieval.

Two families behind one interface (`embed_clips`, `embed_text`, `dim`,
`model_name`):

- `ClipFamilyEmbedder`: any CLIP / SigLIP checkpoint (AutoModel +
  AutoProcessor). A clip's vector is the mean of its L2-normalised frame
  embeddings, re-normalised.
- `CosmosEmbed1Embedder`: NVIDIA Cosmos-Embed1 (224p/336p/448p; 8 frames per
  clip, 768-d) through its `trust_remote_code` model, which embeds the frame
  sequence as a video.

`EmbedStage` wraps either as a pipeline stage: it reads the transient
`embed_*` frame columns, appends `embedding`, and drops the frame columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from udfs.schema import clip_embedding_fields, frame_columns
from udfs.models.loading import local_model_dir, pick_device, pick_dtype
from udfs.media.video import unpack_frames

FRAME_CONSUMER = "embed"


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def uniform_subsample(frames: np.ndarray, count: int) -> np.ndarray:
    """`count` frames spread evenly over the clip (repeats when it has fewer)."""
    if count <= 0 or len(frames) == count or len(frames) == 0:
        return frames
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return frames[picks]


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the
    # projected embedding; 4.x returned the tensor itself.
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find embeddings in model output of type {type(output).__name__}")


def _read_config(model_dir: str) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def embedding_dim(name: str, model: str) -> int:
    """Vector size of embedder `name` for a resolved model folder, read from
    its config without loading weights (the driver needs it for the schema)."""
    model_dir = local_model_dir(model)
    if name == "cosmos_embed1":
        # Remote-code config: read the JSON rather than execute its code on the driver.
        return int(_read_config(model_dir).get("embed_dim", 768))
    from transformers import AutoConfig

    # AutoConfig fills the defaults a checkpoint's config.json leaves out.
    cfg = AutoConfig.from_pretrained(model_dir)
    if getattr(cfg, "projection_dim", None):  # CLIP
        return int(cfg.projection_dim)
    text_cfg = getattr(cfg, "text_config", None)
    for key in ("projection_size", "hidden_size"):  # SigLIP / SigLIP2 text head output
        if text_cfg is not None and getattr(text_cfg, key, None):
            return int(getattr(text_cfg, key))
    raise ValueError(f"cannot tell the embedding size of {model} from its config")


class ClipFamilyEmbedder:
    """CLIP / SigLIP image-text model used as a clip embedder."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", frame_batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoProcessor

        self.model_dir = local_model_dir(model)
        self.model_name = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.frame_batch_size = frame_batch_size
        self.processor = AutoProcessor.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        model_type = getattr(self.model.config, "model_type", "")
        # SigLIP was trained on max-length padded text; CLIP on dynamic padding.
        self._text_padding = "max_length" if model_type.startswith("siglip") else True
        self.dim = embedding_dim("clip", self.model_dir)

    @torch.inference_mode()
    def _image_features(self, frames: list[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(frames), self.frame_batch_size):
            chunk = frames[start : start + self.frame_batch_size]
            inputs = self.processor(images=chunk, return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        """(T_i, H, W, 3) uint8 per clip -> (n, dim) unit vectors.

        Frames of all clips go through the model together in fixed-size
        chunks, so a clip with many frames does not stall a batch of short ones.
        """
        if any(len(c) == 0 for c in clips):
            raise ValueError("every clip needs at least one frame")
        frames = [f for clip in clips for f in clip]
        per_frame = l2_normalize(self._image_features(frames))
        bounds = np.cumsum([0] + [len(c) for c in clips])
        means = np.stack([per_frame[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
        return l2_normalize(means)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        inputs = self.processor(text=list(texts), padding=self._text_padding, truncation=True, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return l2_normalize(_features(self.model.get_text_features(**inputs)).float().cpu().numpy())


def _transformers_compat_for_remote_code() -> None:
    """Cosmos-Embed1's remote code imports helpers from `transformers.modeling_utils`
    that newer transformers keep only in `transformers.pytorch_utils`; alias them."""
    from transformers import modeling_utils

    try:
        from transformers import pytorch_utils
    except ImportError:  # pragma: no cover - very old transformers
        return
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


class CosmosEmbed1Embedder:
    """Cosmos-Embed1 video-text embedder (remote code from the checkpoint).

    The checkpoint's API: `processor(videos=uint8 (B, T, C, H, W))["videos"]`
    into `model.get_video_embeddings(videos=...).visual_proj`; text through
    `processor(text=[...])` into `model.get_text_embeddings(**inputs).text_proj`.
    The processor's `num_video_frames` (8) is how many frames a clip gets.
    """

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", num_frames: int | None = None) -> None:
        from transformers import AutoModel, AutoProcessor

        _transformers_compat_for_remote_code()
        self.model_dir = local_model_dir(model)
        self.model_name = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.processor = AutoProcessor.from_pretrained(self.model_dir, trust_remote_code=True)
        self.num_frames = int(num_frames or getattr(self.processor, "num_video_frames", 8))
        self.model = (
            AutoModel.from_pretrained(self.model_dir, trust_remote_code=True).to(self.device, dtype=self.dtype).eval()
        )
        self.dim = embedding_dim("cosmos_embed1", self.model_dir)

    @torch.inference_mode()
    def embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        if any(len(c) == 0 for c in clips):
            raise ValueError("every clip needs at least one frame")
        out = np.zeros((len(clips), self.dim), np.float32)
        # The processor takes one (B, T, C, H, W) array: group clips of one frame size.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, clip in enumerate(clips):
            groups.setdefault(tuple(clip.shape[1:3]), []).append(i)
        for members in groups.values():
            batch = np.stack([uniform_subsample(clips[i], self.num_frames) for i in members])
            batch = np.ascontiguousarray(batch.transpose(0, 1, 4, 2, 3))
            videos = self.processor(videos=batch, return_tensors="pt")["videos"].to(self.device, self.dtype)
            emb = self.model.get_video_embeddings(videos=videos).visual_proj
            out[members] = emb.float().cpu().numpy()
        return l2_normalize(out)

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        inputs = self.processor(text=list(texts), return_tensors="pt").to(self.device)
        return l2_normalize(self.model.get_text_embeddings(**inputs).text_proj.float().cpu().numpy())


EMBEDDERS = {"clip": ClipFamilyEmbedder, "cosmos_embed1": CosmosEmbed1Embedder}


def load_embedder(name: str, model: str, **kwargs: Any) -> ClipFamilyEmbedder | CosmosEmbed1Embedder:
    try:
        cls = EMBEDDERS[name]
    except KeyError:
        raise ValueError(f"unknown embedder {name!r}; expected one of {sorted(EMBEDDERS)}") from None
    return cls(model, **kwargs)


def filtered_out(batch: pa.Table) -> list[bool]:
    """Rows the filter stage dropped (passed == false); all False without a filter."""
    if "passed" not in batch.column_names:
        return [False] * batch.num_rows
    return [p is False for p in batch.column("passed").to_pylist()]


class EmbedStage:
    """Pipeline stage: `embed_*` frame columns in, `embedding` out.

    Config node `embed` (conf/embed/<name>.yaml): `name` picks the embedder,
    `model`/`device`/`dtype`/`frames` are passed here. `frames.count` is the
    number of frames per clip the model sees (frames are resampled uniformly
    when extraction delivered a different number). With `skip_filtered`,
    clips the filter stage rejected (`passed` false) get a null embedding.
    """

    def __init__(
        self,
        *,
        name: str,
        model: str,
        device: str,
        dtype: str,
        frames: dict[str, Any] | None,
        frame_batch_size: int,
        skip_filtered: bool,
        revision: str | None,
    ) -> None:
        self.name = name
        self.skip_filtered = skip_filtered
        self.model_id = model
        self.revision = revision
        # The driver hands a resolved folder; a hub id must already be in the local cache.
        model = local_model_dir(model, revision=revision)
        self.frame_count = int((frames or {}).get("count", 0) or 0)
        kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
        if name == "clip":
            kwargs["frame_batch_size"] = frame_batch_size
        elif self.frame_count:
            kwargs["num_frames"] = self.frame_count
        self.embedder = load_embedder(name, model, **kwargs)
        self.dim = self.embedder.dim
        self.field = clip_embedding_fields(self.dim)[0]

    def metadata(self) -> dict[str, str]:
        """Facts for the clip table's metadata: which space the vectors live in."""
        meta = {"embedding_model": self.model_id, "embedding_name": self.name, "embedding_dim": str(self.dim)}
        if self.revision:
            meta["embedding_model_revision"] = self.revision
        return meta

    def __call__(self, batch: pa.Table) -> pa.Table:
        frames_col, _, hw_col = frame_columns(FRAME_CONSUMER)
        frames = batch.column(frames_col).to_pylist()
        hws = batch.column(hw_col).to_pylist()
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * batch.num_rows
        skip = filtered_out(batch) if self.skip_filtered else [False] * batch.num_rows

        todo: list[int] = []
        clips: list[np.ndarray] = []
        for row, (err, packed, hw) in enumerate(zip(errors, frames, hws)):
            if err is not None or skip[row]:
                continue
            clip = unpack_frames(packed, hw)
            if len(clip) == 0:
                errors[row] = "embed: no frames extracted"
                continue
            if self.frame_count and self.name == "clip":
                clip = uniform_subsample(clip, self.frame_count)
            todo.append(row)
            clips.append(clip)

        vectors: list[list[float] | None] = [None] * batch.num_rows
        if clips:
            try:
                emb = self.embedder.embed_clips(clips)
            except Exception as exc:  # noqa: BLE001 - a bad batch marks its rows, the run goes on
                for row in todo:
                    errors[row] = f"embed: {type(exc).__name__}: {exc}"
            else:
                if emb.shape[1] != self.dim:
                    raise RuntimeError(f"embedder returned {emb.shape[1]}-d vectors, config says {self.dim}")
                for row, vec in zip(todo, emb):
                    vectors[row] = vec.tolist()

        out = batch.drop_columns([c for c in frame_columns(FRAME_CONSUMER) if c in batch.column_names])
        if "error" in out.column_names:
            out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        return out.append_column(self.field, pa.array(vectors, type=self.field.type))

    def embed_text(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed_text(texts)


class ClipEmbedStage(EmbedStage):
    """`embed=clip`: CLIP / SigLIP family."""

    def __init__(self, **params: Any) -> None:
        params.pop("name", None)
        super().__init__(name="clip", **params)


class CosmosEmbed1Stage(EmbedStage):
    """`embed=cosmos_embed1`: Cosmos-Embed1 224p/336p/448p."""

    def __init__(self, **params: Any) -> None:
        params.pop("name", None)
        super().__init__(name="cosmos_embed1", **params)


# conf/embed/<name>.yaml `name` -> stage class (`none` adds no stage).
EMBED_STAGES: dict[str, type[EmbedStage]] = {"clip": ClipEmbedStage, "cosmos_embed1": CosmosEmbed1Stage}
