"""Clip captions from a Qwen-VL model, per window of source frames and per clip.

A clip is cut into windows of `window_frames` source frames (a remainder of
at least `min_window_frames` becomes its own window, a shorter one merges
into the last), each window's frames are sampled at `sample_fps`, and the VL
model describes each window. An optional text LM rewrites each caption richer
("enhancement").

Backends: `transformers` (CPU or GPU) and `vllm` (GPU, imported lazily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from udfs.schema import CLIP_CAPTION_FIELDS, frame_columns
from udfs.models.embed import filtered_out
from udfs.models.loading import local_model_dir, pick_device, pick_dtype
from udfs.media.video import unpack_frames

FRAME_CONSUMER = "caption"

PROMPTS = {
    "default": (
        "Describe this video in detail: the setting, the objects and people in it, their actions, "
        "how the scene and the camera move over time, and the lighting and visual style."
    ),
}

ENHANCE_PROMPT = (
    "Rewrite the following description of a video so it is richer and more precise, keeping every fact "
    "and adding no new ones. Answer with the rewritten description only.\n\nDescription: {caption}"
)


def resolve_prompt(prompt: str) -> str:
    """A named prompt variant, or the text itself as a custom prompt."""
    return PROMPTS.get(prompt, prompt)


# --------------------------------------------------------------- windowing
def window_spans(num_frames: int, window_frames: int = 256, min_window_frames: int = 128) -> list[tuple[int, int]]:
    """[start, end) spans in clip frames: full windows, a remainder of at
    least `min_window_frames` as its own window, a shorter one merged into
    the last window (a clip shorter than one window is one window)."""
    if num_frames <= 0:
        return []
    full, rest = divmod(num_frames, window_frames)
    spans = [(i * window_frames, (i + 1) * window_frames) for i in range(full)]
    if rest:
        if rest >= min_window_frames or not spans:
            spans.append((full * window_frames, num_frames))
        else:
            spans[-1] = (spans[-1][0], num_frames)
    return spans


def sample_positions(indices: np.ndarray, start: int, end: int, clip_fps: float, sample_fps: float) -> np.ndarray:
    """Positions (into `indices`) of the frames in [start, end) picked at `sample_fps`.

    Takes the first available frame at or after each sampling instant, so
    frames already extracted at the target rate are all kept.
    """
    inside = np.flatnonzero((indices >= start) & (indices < end))
    if len(inside) == 0 or sample_fps <= 0 or not clip_fps:
        return inside
    step = clip_fps / sample_fps
    picks: list[int] = []
    next_at = float(indices[inside[0]])
    for pos in inside:
        if indices[pos] >= next_at - 1e-6:
            picks.append(int(pos))
            next_at = indices[pos] + step
    return np.asarray(picks, dtype=int)


def _sampled_rate(picked_indices: np.ndarray, clip_fps: float, sample_fps: float) -> float:
    """Frames per second the picked frames actually represent (extraction
    may have delivered fewer than `sample_fps`)."""
    if clip_fps and len(picked_indices) >= 2:
        return float(clip_fps / np.median(np.diff(picked_indices)))
    return float(sample_fps)


@dataclass
class Window:
    row: int
    start_frame: int
    end_frame: int
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float  # rate the frames were sampled at


# ----------------------------------------------------------------- backends
def _load_chat_template(model_dir: str, tokenizer: Any) -> str | None:
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _video_prompt(tokenizer: Any, template: str | None, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    if template is None:
        raise ValueError("the captioning model has no chat template")
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def _sampling(temperature: float, top_p: float) -> dict[str, Any]:
    """generate() kwargs: greedy at temperature 0, nucleus sampling otherwise."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False}


class QwenVLTransformersCaptioner:
    """Qwen2-VL / Qwen2.5-VL (own frame patching, see `udfs.models.qwen_vision`) or
    any other VL model whose transformers processor loads (e.g. Qwen3-VL,
    which needs torchvision) through AutoModelForImageTextToText."""

    def __init__(
        self, model: str, *, device: str = "auto", dtype: str = "auto", max_pixels: int | None = None
    ) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

        self.model_dir = local_model_dir(model)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.model_type = config.model_type
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        self.template = _load_chat_template(self.model_dir, self.tokenizer)
        if self.model_type in ("qwen2_vl", "qwen2_5_vl"):
            from udfs.models.qwen_vision import QwenVideoPatcher

            self.patcher: Any = QwenVideoPatcher.from_pretrained(self.model_dir, max_pixels=max_pixels)
            self.processor = None
        else:
            from transformers import AutoProcessor

            self.patcher = None
            try:
                self.processor = AutoProcessor.from_pretrained(self.model_dir)
            except ImportError as exc:
                raise RuntimeError(
                    f"{self.model_type} ({self.model_dir}) needs its transformers video processor, which needs "
                    f"torchvision ({exc}); install torchvision built for this torch, or use a Qwen2/2.5-VL checkpoint"
                ) from exc
        self.video_token = "<|video_pad|>"
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.model = (
            AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        )
        self.last_generated_tokens = 0

    def _inputs(self, prompt: str, windows: list[Window]) -> dict[str, torch.Tensor]:
        text = _video_prompt(self.tokenizer, self.template, prompt)
        if self.processor is not None:
            inputs = self.processor(
                text=[text] * len(windows),
                videos=[w.frames for w in windows],
                video_metadata=[
                    {"fps": w.fps, "total_num_frames": len(w.frames), "frames_indices": list(range(len(w.frames)))}
                    for w in windows
                ],
                do_sample_frames=False,
                padding=True,
                return_tensors="pt",
            )
            return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        patches, grids, texts = [], [], []
        for w in windows:
            p, grid = self.patcher(w.frames)
            patches.append(p)
            grids.append(grid)
            texts.append(text.replace(self.video_token, self.video_token * self.patcher.num_tokens(grid), 1))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        mm_types = (ids == self.video_token_id).long() * 2 + (ids == self.image_token_id).long()
        return {
            "input_ids": ids,
            "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": mm_types,
            "pixel_values_videos": torch.from_numpy(np.concatenate(patches)),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long),
            # Temporal rope positions: seconds covered by one temporal patch.
            "second_per_grid_ts": torch.tensor([self.patcher.temporal_patch_size / w.fps for w in windows]),
        }

    @torch.inference_mode()
    def generate(
        self, prompt: str, windows: list[Window], *, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        inputs = self._inputs(prompt, windows)
        # Pixels in the model's dtype; ids, grids and rope timings as they are.
        inputs = {
            k: v.to(self.device, self.dtype) if k.startswith("pixel_values") else v.to(self.device)
            for k, v in inputs.items()
        }
        torch.manual_seed(seed)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **_sampling(temperature, top_p),
        )
        new = out[:, inputs["input_ids"].shape[1] :]
        self.last_generated_tokens = int((new != self.tokenizer.pad_token_id).sum())
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class QwenVLVllmCaptioner:
    """vLLM offline engine (GPU). Frames go in as `multi_modal_data["video"]`."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_pixels: int | None = None,
        max_model_len: int = 32768,
        gpu_memory_utilization: float = 0.85,
    ) -> None:
        from transformers import AutoTokenizer
        from vllm import LLM  # lazy: GPU machines only

        self.model_dir = local_model_dir(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.template = _load_chat_template(self.model_dir, self.tokenizer)
        mm_kwargs = {"max_pixels": max_pixels} if max_pixels else None
        self.llm = LLM(
            model=self.model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            limit_mm_per_prompt={"video": 1, "image": 0},
            mm_processor_kwargs=mm_kwargs,
        )
        self.last_generated_tokens = 0

    def generate(
        self, prompt: str, windows: list[Window], *, max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[str]:
        from vllm import SamplingParams

        text = _video_prompt(self.tokenizer, self.template, prompt)
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        requests = [
            {
                "prompt": text,
                "multi_modal_data": {"video": w.frames},
                "mm_processor_kwargs": {"fps": w.fps, "do_sample_frames": False},
            }
            for w in windows
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self.last_generated_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return [o.outputs[0].text.strip() for o in outputs]


class CaptionEnhancer:
    """Text LM (e.g. Qwen2.5-*-Instruct) that rewrites captions richer."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt: str = ENHANCE_PROMPT,
        max_new_tokens: int = 512,
        temperature: float = 0.1,
        top_p: float = 0.001,
        batch_size: int = 16,
        revision: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = local_model_dir(model, revision=revision)
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()

    def _text(self, caption: str) -> str:
        content = self.prompt.format(caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content

    @torch.inference_mode()
    def enhance(self, captions: list[str], seed: int = 0) -> list[str]:
        out: list[str] = [""] * len(captions)
        # Similar lengths together: less padding per batch.
        order = sorted(range(len(captions)), key=lambda i: len(captions[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            texts_in = [self._text(captions[i]) for i in chunk]
            enc = self.tokenizer(texts_in, padding=True, return_tensors="pt").to(self.device)
            torch.manual_seed(seed)
            gen = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **_sampling(self.temperature, self.top_p),
            )
            texts = self.tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                out[i] = text.strip()
        return out


def load_captioner(backend: str, model: str, **kwargs: Any) -> QwenVLTransformersCaptioner | QwenVLVllmCaptioner:
    if backend == "transformers":
        return QwenVLTransformersCaptioner(model, **kwargs)
    if backend == "vllm":
        if not torch.cuda.is_available():
            raise RuntimeError("caption.backend=vllm needs a CUDA GPU; use caption.backend=transformers")
        kwargs.pop("device", None)
        return QwenVLVllmCaptioner(model, **kwargs)
    raise ValueError(f"unknown caption backend {backend!r}; expected transformers or vllm")


# -------------------------------------------------------------------- stage
_WINDOW_TYPE = next(f.type for f in CLIP_CAPTION_FIELDS if f.name == "caption_windows")


class CaptionStage:
    """Pipeline stage: `caption_*` frame columns (+ `num_frames`, `fps`) in,
    `caption`, `caption_enhanced`, `caption_windows` out.

    Windows of all clips in a batch are captioned together, sorted by their
    number of frames and cut into groups of `batch_size`, so one long clip
    does not pad a whole batch. With `skip_filtered` (default), clips the
    filter stage rejected (`passed` false) are not captioned (null columns).
    """

    def __init__(
        self,
        *,
        model: str,
        backend: str,
        prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        batch_size: int,
        window_frames: int,
        min_window_frames: int,
        sample_fps: float,
        max_pixels: int | None,
        enhance: dict[str, Any] | None,
        device: str,
        dtype: str,
        seed: int,
        skip_filtered: bool,
        frames: dict[str, Any] | None,  # what frame extraction must deliver; read by the driver
        revision: str | None,
    ) -> None:
        # The driver hands a resolved folder; a hub id must already be in the local cache.
        model = local_model_dir(model, revision=revision)
        self.prompt = resolve_prompt(prompt)
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.window_frames = window_frames
        self.min_window_frames = min_window_frames
        self.sample_fps = sample_fps
        self.seed = seed
        self.skip_filtered = skip_filtered
        self.captioner = load_captioner(backend, model, device=device, dtype=dtype, max_pixels=max_pixels)
        self.enhancer = None
        if enhance and enhance.get("model"):
            opts = {k: v for k, v in enhance.items() if k != "model"}
            opts.setdefault("device", device)
            opts.setdefault("dtype", dtype)
            self.enhancer = CaptionEnhancer(enhance["model"], **opts)
        self.generated_tokens = 0  # running total, for throughput reporting

    def windows_for(
        self, row: int, frames: np.ndarray, indices: np.ndarray, num_frames: int, fps: float
    ) -> list[Window]:
        out = []
        for start, end in window_spans(num_frames, self.window_frames, self.min_window_frames):
            picks = sample_positions(indices, start, end, fps, self.sample_fps)
            if len(picks) == 0:
                continue
            out.append(Window(row, start, end, frames[picks], _sampled_rate(indices[picks], fps, self.sample_fps)))
        return out

    def caption_windows(self, windows: list[Window]) -> tuple[list[str | None], dict[int, str]]:
        """Caption every window; returns the captions (None where failed) and
        the failure message per failed window index. A failed generate call
        fails only the windows it held."""
        captions: list[str | None] = [None] * len(windows)
        failures: dict[int, str] = {}
        # Smallest first (frames x pixels ~ vision tokens): similar windows share a batch.
        order = sorted(range(len(windows)), key=lambda i: int(np.prod(windows[i].frames.shape[:3])))
        # vLLM schedules requests itself (continuous batching): hand it everything at once.
        step = max(len(order), 1) if isinstance(self.captioner, QwenVLVllmCaptioner) else self.batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            try:
                texts = self.captioner.generate(
                    self.prompt,
                    [windows[i] for i in chunk],
                    max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    seed=self.seed,
                )
            except Exception as exc:  # noqa: BLE001 - failed windows mark their rows, the run goes on
                failures.update({i: f"caption: {type(exc).__name__}: {exc}" for i in chunk})
                continue
            self.generated_tokens += self.captioner.last_generated_tokens
            for i, text in zip(chunk, texts):
                captions[i] = text
        return captions, failures

    def enhance_captions(self, captions: list[str | None]) -> tuple[list[str | None], dict[int, str]]:
        enhanced: list[str | None] = [None] * len(captions)
        if self.enhancer is None:
            return enhanced, {}
        todo = [i for i, c in enumerate(captions) if c is not None]
        try:
            for i, text in zip(todo, self.enhancer.enhance([captions[i] for i in todo], seed=self.seed)):
                enhanced[i] = text
        except Exception as exc:  # noqa: BLE001
            return enhanced, {i: f"caption enhance: {type(exc).__name__}: {exc}" for i in todo}
        return enhanced, {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        frames_col, indices_col, hw_col = frame_columns(FRAME_CONSUMER)
        packed = batch.column(frames_col).to_pylist()
        indices = batch.column(indices_col).to_pylist()
        hws = batch.column(hw_col).to_pylist()
        n = batch.num_rows
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * n
        num_frames = batch.column("num_frames").to_pylist() if "num_frames" in batch.column_names else [None] * n
        fpss = batch.column("fps").to_pylist() if "fps" in batch.column_names else [None] * n
        skip = filtered_out(batch) if self.skip_filtered else [False] * n

        windows: list[Window] = []
        for row in range(n):
            if errors[row] is not None or skip[row]:
                continue
            frames = unpack_frames(packed[row], hws[row])
            if len(frames) == 0:
                errors[row] = "caption: no frames extracted"
                continue
            idx = np.asarray(indices[row], dtype=np.int64)
            total = int(num_frames[row]) if num_frames[row] else int(idx.max()) + 1
            windows.extend(self.windows_for(row, frames, idx, total, float(fpss[row] or 0.0)))

        captions, failures = self.caption_windows(windows)
        enhanced, enhance_failures = self.enhance_captions(captions)
        for i, message in {**failures, **enhance_failures}.items():
            errors[windows[i].row] = errors[windows[i].row] or message
        per_row: dict[int, list[dict[str, Any]]] = {}
        for w, cap, enh in zip(windows, captions, enhanced):
            if errors[w.row] is None:
                per_row.setdefault(w.row, []).append(
                    {"start_frame": w.start_frame, "end_frame": w.end_frame, "caption": cap, "caption_enhanced": enh}
                )

        caption_col: list[str | None] = [None] * n
        enhanced_col: list[str | None] = [None] * n
        windows_col: list[list[dict[str, Any]] | None] = [None] * n
        for row, items in per_row.items():
            windows_col[row] = items
            caption_col[row] = " ".join(i["caption"] for i in items if i["caption"])
            if self.enhancer:
                enhanced_col[row] = " ".join(i["caption_enhanced"] for i in items if i["caption_enhanced"])

        out = batch.drop_columns([c for c in frame_columns(FRAME_CONSUMER) if c in batch.column_names])
        if "error" in out.column_names:
            out = out.set_column(out.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
        values = {"caption": caption_col, "caption_enhanced": enhanced_col, "caption_windows": windows_col}
        for field in CLIP_CAPTION_FIELDS:
            out = out.append_column(field, pa.array(values[field.name], type=field.type))
        return out


# conf/caption/<name>.yaml `name` -> stage class (`none` adds no stage).
CAPTION_STAGES: dict[str, type[CaptionStage]] = {"qwen_vl": CaptionStage}
