"""Learned models over clip frames: where weights come from and what device
they run on (`loading`), embeddings, captions, Qwen vision preprocessing."""

from typing import Any

import pyarrow as pa

from udfs.schema import CLIP_CAPTION_FIELDS, clip_embedding_fields
from udfs.spec import StageSpec, fields


def _embedding_columns(params: dict[str, Any]) -> list[pa.Field]:
    # Reads the model's config (not its weights) for the vector size.
    from udfs.models.embed import embedding_dim

    return clip_embedding_fields(embedding_dim(params["name"], params["model"]))


_EMBED = dict(node="embed", level="clip", step="embed", switch=("name", "none"),
              runtime_keys=frozenset({"frame_batch_size"}), columns=_embedding_columns, frames="embed.frames",
              frame_consumer="embed", models=("model",), supplied=("name",))

STAGES = [
    StageSpec(choice="clip", impl="udfs.models.embed:ClipEmbedStage", **_EMBED),
    StageSpec(choice="cosmos_embed1", impl="udfs.models.embed:CosmosEmbed1Stage", **_EMBED),
    StageSpec(node="caption", choice="qwen_vl", impl="udfs.models.caption:CaptionStage", level="clip", step="caption",
              switch=("name", "none"), runtime_keys=frozenset({"batch_size"}), columns=fields(CLIP_CAPTION_FIELDS),
              frames="caption.frames", frame_consumer="caption", models=("model", "enhance.model")),
]
