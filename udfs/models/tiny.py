"""Randomly initialised checkpoints for tests and benchmarks.

No weights can be downloaded here, so tests and benchmarks build models with
the real architectures (tiny for tests, full-size for benchmarks), save them
with `save_pretrained` and load them through the same code users run. The
tokenizers are small BPEs trained on the spot, with the special tokens the
Qwen chat templates and processors need.
"""

from __future__ import annotations

from pathlib import Path

import torch

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL-style chat template: text and vision placeholders in user turns.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "a video of a cat sitting on a red mat while the camera slowly pans to the left",
    "a car drives along a coastal road at sunset, waves crash against the rocks",
    "two people walk through a busy market, colourful stalls and bright lights",
    "describe this video in detail: the setting, objects, people, actions and camera motion",
    "rewrite the following description of a video so it is richer and more precise",
    "the scene is lit by warm afternoon light; a dog runs across a green field",
]


def train_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


def qwen_tokenizer(vocab_size: int = 400, chat_template: str | None = QWEN_VL_CHAT_TEMPLATE):
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        chat_template=chat_template,
        model_max_length=32768,
    )


def _clip_tokenizer(vocab_size: int, max_len: int):
    from transformers import PreTrainedTokenizerFast

    from tokenizers.processors import TemplateProcessing

    tok = train_bpe(vocab_size, ["<pad>", "<unk>", "<s>", "</s>"])
    # CLIP pools the text at the end-of-text token, so every text must carry one.
    tok.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        model_max_length=max_len,
    )


def _mute_special_tokens(model: torch.nn.Module, tok) -> None:
    """Zero the (tied) embedding rows of special tokens: a random model then
    rarely picks them greedily, so it emits visible text instead of stopping
    at once, which lets tests and benchmarks see real generated tokens."""
    ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS]
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = 0


def build_clip(
    out_dir: str | Path,
    *,
    vision_hidden: int = 32,
    text_hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    text_heads: int | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    projection_dim: int = 24,
    vocab_size: int = 300,
    max_text_len: int = 32,
    seed: int = 0,
) -> str:
    """A random CLIPModel + CLIPProcessor (PIL image backend) saved to `out_dir`."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tok = _clip_tokenizer(vocab_size, max_text_len)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=4 * text_hidden, num_hidden_layers=layers,
            num_attention_heads=text_heads or heads, max_position_embeddings=max_text_len,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=layers,
            num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(out_dir)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out_dir)
    return str(out_dir)


def build_siglip(
    out_dir: str | Path,
    *,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 300,
    max_text_len: int = 16,
    seed: int = 0,
) -> str:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    tok = _clip_tokenizer(vocab_size, max_text_len)
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=max_text_len,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
            image_size=image_size, patch_size=patch_size,
        ),
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(out_dir)
    SiglipProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tok
    ).save_pretrained(out_dir)
    return str(out_dir)


def build_qwen2_5_vl(
    out_dir: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 1,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    vocab_size: int = 400,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16 * 28 * 28,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> str:
    """A random Qwen2.5-VL with a locally trained tokenizer, its image
    processor config (PIL backend: no torchvision) and chat template."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = qwen_tokenizer(vocab_size)
    head_dim = hidden // heads
    # mrope sections (temporal, height, width) split head_dim/2 rotary pairs.
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
            rope_scaling={"type": "mrope", "mrope_section": section}, bos_token_id=None,
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
            num_heads=vision_heads, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
            window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    _mute_special_tokens(model, tok)
    if dtype is not None:  # e.g. bf16 for 7B-sized benchmarks: half the disk and load time
        model = model.to(dtype)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(out_dir)
    (Path(out_dir) / "chat_template.jinja").write_text(QWEN_VL_CHAT_TEMPLATE)
    return str(out_dir)


QWEN_TEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_lm(
    out_dir: str | Path,
    *,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 64,
    vocab_size: int = 400,
    seed: int = 0,
) -> str:
    """A random Qwen2ForCausalLM (the Qwen2.5-instruct architecture) with a chat template."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = qwen_tokenizer(vocab_size, chat_template=QWEN_TEXT_CHAT_TEMPLATE)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    _mute_special_tokens(model, tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


# ---------------------------------------------------------- Cosmos-Embed1 stand-in
# Cosmos-Embed1 ships its architecture as remote code inside its checkpoint,
# which cannot be fetched here. This stand-in is a tiny remote-code checkpoint
# with the same surface (AutoModel/AutoProcessor with trust_remote_code,
# processor(videos=uint8 (B,T,C,H,W))["videos"], processor.num_video_frames,
# get_video_embeddings(videos=).visual_proj, get_text_embeddings(**text).text_proj,
# config.embed_dim), so the embedder's loading and calling code is exercised.
_STANDIN_CONFIG = '''
from transformers import PretrainedConfig


class StandinEmbedConfig(PretrainedConfig):
    model_type = "reelsift_video_text_standin"

    def __init__(self, embed_dim=16, resolution=32, num_video_frames=8, vocab_size=300, width=8, **kwargs):
        self.embed_dim = embed_dim
        self.resolution = resolution
        self.num_video_frames = num_video_frames
        self.vocab_size = vocab_size
        self.width = width
        super().__init__(**kwargs)
'''

_STANDIN_MODELING = '''
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_standin import StandinEmbedConfig


@dataclass
class VideoOutput(ModelOutput):
    visual_proj: torch.FloatTensor | None = None


@dataclass
class TextOutput(ModelOutput):
    text_proj: torch.FloatTensor | None = None


class StandinEmbedModel(PreTrainedModel):
    config_class = StandinEmbedConfig

    def __init__(self, config):
        super().__init__(config)
        self.patch = torch.nn.Conv2d(3, config.width, 8, 8)
        self.video_proj = torch.nn.Linear(config.width * config.num_video_frames, config.embed_dim)
        self.token = torch.nn.Embedding(config.vocab_size, config.embed_dim)
        self.text_proj = torch.nn.Linear(config.embed_dim, config.embed_dim)
        self.post_init()

    def get_video_embeddings(self, videos):
        b, t = videos.shape[:2]
        x = self.patch(videos.flatten(0, 1)).mean(dim=(-1, -2)).view(b, t * self.config.width)
        return VideoOutput(visual_proj=F.normalize(self.video_proj(x), dim=-1))

    def get_text_embeddings(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(self.token.weight.dtype)
        x = (self.token(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return TextOutput(text_proj=F.normalize(self.text_proj(x), dim=-1))
'''

_STANDIN_PROCESSING = '''
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, PreTrainedTokenizerFast


class StandinEmbedProcessor:
    def __init__(self, tokenizer, resolution, num_video_frames):
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.num_video_frames = num_video_frames

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        cls._auto_class = auto_class

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            cfg = json.load(f)
        return cls(PreTrainedTokenizerFast.from_pretrained(path), cfg["resolution"], cfg["num_video_frames"])

    def __call__(self, videos=None, text=None, return_tensors="pt"):
        if videos is not None:
            v = torch.from_numpy(np.asarray(videos)).float() / 255.0
            b, t, c, h, w = v.shape
            v = F.interpolate(v.flatten(0, 1), size=(self.resolution, self.resolution), mode="bilinear")
            return BatchFeature({"videos": v.view(b, t, c, self.resolution, self.resolution)})
        enc = self.tokenizer(list(text), padding=True, return_tensors="pt")
        return BatchFeature({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
'''


def build_video_text_standin(out_dir: str | Path, *, embed_dim: int = 16, resolution: int = 32,
                             num_video_frames: int = 8, seed: int = 0) -> str:
    """Tiny remote-code video-text embedder with Cosmos-Embed1's calling surface."""
    import json

    from transformers import AutoConfig, AutoModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "configuration_standin.py").write_text(_STANDIN_CONFIG)
    (out / "modeling_standin.py").write_text(_STANDIN_MODELING)
    (out / "processing_standin.py").write_text(_STANDIN_PROCESSING)
    tok = _clip_tokenizer(300, 32)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_standin.StandinEmbedProcessor"},
        "resolution": resolution, "num_video_frames": num_video_frames,
    }))
    (out / "config.json").write_text(json.dumps({
        "model_type": "reelsift_video_text_standin",
        "auto_map": {"AutoConfig": "configuration_standin.StandinEmbedConfig",
                     "AutoModel": "modeling_standin.StandinEmbedModel"},
        "embed_dim": embed_dim, "resolution": resolution, "num_video_frames": num_video_frames,
        "vocab_size": len(tok),
    }))
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, trust_remote_code=True)
    model.save_pretrained(out)
    return str(out)
