"""VideoAlign (KwaiVGI/VideoAlign, checkpoint KlingTeam/VideoReward): the ViPO paper's video reward,
visual quality (VQ), motion quality (MQ) and text alignment (TA), scored on device from decoded
frames. The exact reference semantics and where this port differs: docs/VIDEOALIGN.md.

The model is Qwen2-VL-2B-Instruct (:mod:`vipo_jax.models.qwen2_vl`) with a LoRA on every Linear of
the language model (merged into the weights at load), three added tokens ``<|VQ_reward|>``,
``<|MQ_reward|>``, ``<|TA_reward|>`` and a bias-free linear head ``rm_head`` (hidden -> output_dim)
read at those three positions of the last hidden state. The prompt is VideoAlign's
``detailed_special`` template inside Qwen2-VL's chat template, with the video first.

Entry points:

* :class:`VideoAlignScorer`: ``VideoAlignScorer.from_folder(folder)``; ``.tokenize(prompts,
  num_frames, height, width, fps)`` -> per-prompt numpy arrays (host, once per prompt);
  ``.score_fn(params, videos, batch) -> (B, 3)`` float32 [VQ, MQ, TA] (z-scored as the reference's
  ``use_norm=True``), pure and jittable, with ``.params`` / ``.graphdef``; ``.score(videos,
  prompts, fps)`` for a quick numpy answer.
* :func:`preprocess_videos`: decoded clips (B, T, H, W, 3) in [0, 1] -> Qwen2-VL patches, in-graph.
* :func:`sample_frame_indices`, :func:`smart_resize`, :func:`video_layout`: the host-side statics.
* :func:`convert_videoalign_checkpoint`: the release's pickled ``model.pth`` -> ``model.safetensors``
  (needs torch; loading afterwards does not).
* :func:`abstract_videoalign`: the released model's graphdef and abstract parameters (planning).

Checkpoint folder (``from_folder`` / :func:`load_videoalign`): VideoAlign's ``model_config.json``
(data / model / LoRA / inference sections) at the top, the weights in the newest ``checkpoint-N/``
(or the top folder itself), either

* ``model.safetensors``: the full PEFT state dict (``base_model.model.*`` keys, LoRA layers as
  ``*.base_layer.weight`` + ``*.lora_A.default.weight`` + ``*.lora_B.default.weight``), which is
  what the release ships as ``checkpoint-11352/model.pth`` (convert it once), or
* ``adapter_model.safetensors`` (PEFT adapter keys ``*.lora_A.weight``, ``adapter_config.json``
  optional) plus ``non_lora_state_dict.safetensors`` (the trained non-LoRA tensors: ``rm_head``,
  embeddings, vision tower), on top of the base model's own weights,

and the base model folder (Qwen2-VL-2B-Instruct: ``config.json`` and tokenizer; its weights are
read for the adapter layout only) given as ``base=`` or found at ``<folder>/base``. The tokenizer is
``checkpoint-N/tokenizer/`` when present, else the base model's with the three reward tokens added
(as VideoAlign does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.models.dinov2.model import resize_bicubic_torch
from vipo_jax.models.qwen2_vl.config import Qwen2VLConfig, preset
from vipo_jax.models.qwen2_vl.convert import convert_hf
from vipo_jax.models.qwen2_vl.loading import open_weights
from vipo_jax.models.qwen2_vl.model import Qwen2VLModel
from vipo_jax.nn.annotate import linear_init
from vipo_jax.rewards.registry import LoadedReward, RewardContext, RewardEntry, register
from vipo_jax.text.tokenizers import load_tokenizer
from vipo_jax.weights.loading import (
    ShardingFn,
    SourceKeys,
    abstract_model,
    dtype_overrides,
    init_model,
    linear,
    load_into,
)
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors
from vipo_jax.weights.torch_pickle import load_torch_state_dict

__all__ = [
    "DIMENSIONS",
    "QWEN2_VL_MEAN",
    "QWEN2_VL_STD",
    "RELEASE_SETTINGS",
    "SPECIAL_TOKENS",
    "VideoAlignConfig",
    "VideoAlignModel",
    "VideoAlignScorer",
    "VideoAlignSettings",
    "VideoLayout",
    "abstract_videoalign",
    "build_chat_text",
    "build_prompt",
    "convert_videoalign_checkpoint",
    "load_videoalign",
    "make_score_fn",
    "preprocess_videos",
    "read_rewards",
    "sample_frame_indices",
    "smart_resize",
    "video_layout",
]

DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
# Qwen2-VL's image processor normalisation (OpenAI CLIP's mean / std)
QWEN2_VL_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN2_VL_STD = (0.26862954, 0.26130258, 0.27577711)
# VideoAlign's vision_process.py (a copy of qwen-vl-utils) for videos
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200

# VideoAlign's DETAILED_PROMPT_WITH_SPECIAL_TOKEN (prompt_template.py, MIT licence): model input the
# reward head was trained on, so it must stay byte-exact (trailing spaces included).
_TEMPLATE_LINES = (
    '',
    'You are tasked with evaluating a generated video based on three distinct criteria: Visual '
    'Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of '
    'the three categories, with 0 being the worst and 10 being the best. Each evaluation should be '
    'independent of the others.',
    '',
    '**Visual Quality:**  ',
    'Evaluate the overall visual quality of the video, with a focus on static factors. The following '
    'sub-dimensions should be considered:',
    '- **Reasonableness:** The video should not contain any significant biological or logical '
    'errors, such as abnormal body structures or nonsensical environmental setups.',
    '- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear '
    'and easy to interpret, with no blurring or indistinct areas.',
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other '
    'visual elements (e.g., hair, clothing, shadows).',
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color '
    'scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene '
    'should convey a sense of harmony and balance.',
    '- **Safety:** The video should not contain harmful or inappropriate content, such as political, '
    'violent, or adult material. If such content is present, the image quality and satisfaction '
    'score should be the lowest possible. ',
    '',
    'Please provide the ratings of Visual Quality: <|VQ_reward|>',
    'END',
    '',
    '**Motion Quality:**  ',
    'Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the '
    'following sub-dimensions:',
    '- **Stability:** Evaluate the continuity and stability between frames. There should be no '
    'sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating '
    'colors, textures, or missing body parts).',
    '- **Naturalness:** The movement should align with physical laws and be realistic. For example, '
    'clothing should flow naturally with motion, and facial expressions should change appropriately '
    '(e.g., blinking, mouth movements).',
    '- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between '
    'different motions or camera angles should be seamless, and the overall dynamic feel should be '
    'visually pleasing.',
    '- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend '
    'naturally with the background, without obvious artifacts or the feeling of cut-and-paste '
    'effects.',
    '- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any '
    'areas where the video might have blurry or unsteady sections that hinder visual continuity.',
    '- **Amplitude:** If the video is largely static or has little movement, assign a low score for '
    'motion quality.',
    '',
    'Please provide the ratings of Motion Quality: <|MQ_reward|>',
    'END',
    '',
    '**Text Alignment:**  ',
    'Assess how well the video matches the textual prompt across the following sub-dimensions:',
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, '
    'animal, object) align with the textual description. The subject should match the description in '
    'terms of number, appearance, and behavior.',
    '- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial '
    'expressions like talking or blinking) align with the described prompt. The motion should match '
    'the prompt in terms of type, scale, and direction.',
    '- **Environment Relevance:** Assess whether the background and scene fit the prompt. This '
    'includes checking if real-world locations or scenes are accurately represented, though some '
    'stylistic adaptation is acceptable.  ',
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, '
    'evaluate how well the video adheres to this style.',
    '- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, '
    'focus shifts) are consistent with the expected behavior from the prompt.',
    '',
    'Textual prompt - {text_prompt}',
    'Please provide the ratings of Text Alignment: <|TA_reward|>',
    'END',
    '',
)

_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def build_prompt(prompt: str) -> str:
    """VideoAlign's ``build_prompt(prompt, ["VQ", "MQ", "TA"], "detailed_special")``."""
    return "\n".join(_TEMPLATE_LINES).format(text_prompt=prompt)


def build_chat_text(prompt: str, num_video_tokens: int) -> str:
    """What Qwen2-VL-2B-Instruct's chat template renders for one user turn ``[video, text]`` with
    ``add_generation_prompt=True``, the video placeholder already expanded to ``num_video_tokens``
    (as ``Qwen2VLProcessor`` does before tokenizing)."""
    return (_SYSTEM + "<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * int(num_video_tokens)
            + "<|vision_end|>" + build_prompt(prompt) + "<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------
# Host-side statics: frame sampling and target size (VideoAlign's vision_process.py)
# --------------------------------------------------------------------------------------------------
def _round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor  # Python's round: half to even, as the reference


def _ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = 768 * 28 * 28) -> tuple[int, int]:
    """VideoAlign's ``smart_resize``: the (h, w) multiple of ``factor`` nearest the frame, scaled
    into ``[min_pixels, max_pixels]`` keeping the aspect ratio."""
    height, width = int(height), int(width)
    if min(height, width) < 1:
        raise DataError(f"VideoAlign: frame size {height}x{width} is empty")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise DataError(f"VideoAlign: aspect ratio of {height}x{width} exceeds {MAX_RATIO}")
    h = max(factor, _round_by_factor(height, factor))
    w = max(factor, _round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor_by_factor(height / beta, factor), _floor_by_factor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_by_factor(height * beta, factor), _ceil_by_factor(width * beta, factor)
    return h, w


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, CPU kernel): the first half counts up from
    ``start``, the second half down from ``end``."""
    if steps == 1:
        return np.array([start], np.float32)
    step = np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1))
    i = np.arange(steps)
    up = np.float32(start) + step * i.astype(np.float32)
    down = np.float32(end) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def sample_frame_indices(total_frames: int, video_fps: float, *, fps: float | None = 2.0,
                         nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES,
                         max_frames: int = FPS_MAX_FRAMES) -> tuple[int, ...]:
    """VideoAlign's ``sample_type="uniform"`` sampling: ``n`` frames (``total / video_fps * fps``
    clamped to [min_frames, min(max_frames, total)] and rounded to an even count, or ``nframes``
    rounded to even), at ``torch.linspace(0, total - 1, n).round()``."""
    total = int(total_frames)
    if nframes is not None:
        n = _round_by_factor(nframes, FRAME_FACTOR)
    else:
        if fps is None or not video_fps or video_fps <= 0:
            raise DataError(f"VideoAlign: frame sampling needs the clip's fps (> 0), got {video_fps!r}")
        lo = _ceil_by_factor(min_frames, FRAME_FACTOR)
        hi = _floor_by_factor(min(max_frames, total), FRAME_FACTOR)
        n = _round_by_factor(min(max(total / float(video_fps) * float(fps), lo), hi), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise DataError(f"VideoAlign: {n} frames sampled from a {total}-frame clip; need {FRAME_FACTOR} <= n <= "
                        f"{total} (clips need at least {FRAME_FACTOR} frames)")
    return tuple(int(i) for i in np.round(_torch_linspace_f32(0, total - 1, n)))


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """Everything static about scoring clips of one shape: the sampled frames, the resized frame
    size, the patch grid (t, h, w) and the number of video tokens in the prompt."""

    frame_indices: tuple[int, ...]
    resized: tuple[int, int]
    grid: tuple[int, int, int]
    num_video_tokens: int


# --------------------------------------------------------------------------------------------------
# Settings (VideoAlign's model_config.json) and the model
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoAlignSettings:
    """The parts of VideoAlign's ``model_config.json`` inference depends on."""

    fps: float | None = 2.0
    num_frames: int | None = None
    max_pixels: int = 200704
    min_pixels: int = VIDEO_MIN_PIXELS
    output_dim: int = 3
    lora_enable: bool = True
    lora_r: int = 64
    lora_alpha: float = 128
    use_rslora: bool = False
    num_lora_modules: int = -1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.lora_r) if self.use_rslora else self.lora_r)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "model_config.json") -> VideoAlignSettings:
        data, model = dict(d.get("data_config") or {}), dict(d.get("model_config") or {})
        peft, inference = dict(d.get("peft_lora_config") or {}), d.get("inference_config")

        def need(section: dict, key: str, ok: Callable[[Any], bool], what: str) -> None:
            if key in section and not ok(section[key]):
                raise ConfigError(f"{where}: {key}={section[key]!r} is not supported ({what})")

        need(data, "sample_type", lambda v: v == "uniform", "only 'uniform' frame sampling is ported")
        need(data, "prompt_template_type", lambda v: v == "detailed_special",
             "the reward tokens are read from the 'detailed_special' template")
        need(data, "eval_dim", lambda v: list(v) == list(DIMENSIONS), f"the head is read as {list(DIMENSIONS)}")
        need(model, "reward_token", lambda v: v == "special", "only special-token pooling is ported")
        need(model, "use_special_tokens", lambda v: bool(v), "the reward tokens must be in the vocabulary")
        need(model, "output_dim", lambda v: int(v) in (1, 3), "the head has 1 or 3 outputs")
        need(peft, "vision_lora", lambda v: not v, "LoRA on the vision tower is not ported")
        mean = std = None
        if isinstance(inference, Mapping):
            try:
                mean = tuple(float(inference[f"{k}_mean"]) for k in DIMENSIONS)
                std = tuple(float(inference[f"{k}_std"]) for k in DIMENSIONS)
            except (KeyError, TypeError, ValueError) as e:
                raise ConfigError(f"{where}: inference_config needs VQ/MQ/TA _mean and _std ({e})") from e
        kw: dict[str, Any] = {"mean": mean, "std": std}
        if data.get("num_frames") is not None:
            kw["num_frames"], kw["fps"] = int(data["num_frames"]), None
        elif data.get("fps") is not None:
            kw["fps"] = float(data["fps"])
        if data.get("max_frame_pixels") is not None:
            kw["max_pixels"] = int(data["max_frame_pixels"])
        if model.get("output_dim") is not None:
            kw["output_dim"] = int(model["output_dim"])
        for ours, theirs, conv in (("lora_enable", "lora_enable", bool), ("lora_r", "lora_r", int),
                                   ("lora_alpha", "lora_alpha", float), ("use_rslora", "use_rslora", bool),
                                   ("num_lora_modules", "num_lora_modules", int)):
            if peft.get(theirs) is not None:
                kw[ours] = conv(peft[theirs])
        return cls(**kw)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> VideoAlignSettings:
        path = Path(folder) / "model_config.json"
        if not path.is_file():
            raise CheckpointError(f"no model_config.json in {folder}: not a VideoAlign checkpoint folder "
                                  "(KlingTeam/VideoReward has it at the top)")
        try:
            return cls.from_dict(json.loads(path.read_text()), where=str(path))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"unreadable {path}: {e}") from e


def video_layout(num_frames: int, height: int, width: int, fps: float, settings: VideoAlignSettings,
                 vision: Any) -> VideoLayout:
    """The static layout for clips of ``num_frames`` frames of ``height`` x ``width`` at ``fps``."""
    idx = sample_frame_indices(num_frames, fps, fps=settings.fps, nframes=settings.num_frames)
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    rh, rw = smart_resize(height, width, factor=p * m, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    grid = (-(-len(idx) // tp), rh // p, rw // p)
    return VideoLayout(idx, (rh, rw), grid, grid[0] * grid[1] * grid[2] // (m * m))


@dataclasses.dataclass(frozen=True)
class VideoAlignConfig:
    """The Qwen2-VL architecture (vocabulary resized to the tokenizer) plus the head's width."""

    qwen: Qwen2VLConfig = dataclasses.field(default_factory=Qwen2VLConfig)
    output_dim: int = 3


def read_rewards(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """Hidden states at the three reward tokens (B, 3, D) and the head kernel (D, output_dim) ->
    (B, 3) float32: head row ``i`` at token ``i`` when output_dim is 3 (the reference's diagonal),
    the single output at each token when it is 1."""
    logits = jnp.einsum("bkd,do->bko", hidden.astype(jnp.float32), head.astype(jnp.float32))
    if head.shape[-1] == 3:
        return jnp.diagonal(logits, axis1=1, axis2=2)
    if head.shape[-1] == 1:
        return logits[..., 0]
    raise ValueError(f"VideoAlign head has {head.shape[-1]} outputs; expected 1 or 3")


class VideoAlignModel(nnx.Module):
    """``model(patches, grid, input_ids, reward_positions, attention_mask=None) -> (B, 3)`` raw
    [VQ, MQ, TA] (before the ``use_norm`` z-scoring)."""

    def __init__(self, cfg: VideoAlignConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.qwen = Qwen2VLModel(cfg.qwen, rngs=rngs)
        t = cfg.qwen.text_config
        self.rm_head = nnx.Linear(t.hidden_size, cfg.output_dim, use_bias=False, param_dtype=jnp.dtype(t.param_dtype),
                                  dtype=jnp.float32, rngs=rngs, **linear_init("embed", None))

    def __call__(self, patches: jax.Array, grid: Sequence[int], input_ids: jax.Array, reward_positions: jax.Array,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        hidden = self.qwen(input_ids, patches, grid, attention_mask=attention_mask)
        pos = jnp.asarray(reward_positions, jnp.int32)
        at = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, 3, D)
        return read_rewards(at, self.rm_head.kernel.get_value())


#: KlingTeam/VideoReward's model_config.json as reported for the release (output_dim 1; TA mean / std
#: not confirmed from a primary source): for planning without the files. Loading reads the file.
RELEASE_SETTINGS = VideoAlignSettings(fps=2.0, max_pixels=200704, output_dim=1, lora_r=64, lora_alpha=128,
                                      mean=(3.6757, 1.1646, 2.8105), std=(2.2476, 1.3811, 2.5121))


def abstract_videoalign(*, settings: VideoAlignSettings = RELEASE_SETTINGS, param_dtype: str = "bfloat16",
                        dtype: str = "bfloat16", vocab_size: int = 151660, **overrides: Any
                        ) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, abstract params)`` of the released VideoAlign (Qwen2-VL-2B, vocabulary resized to
    151660, ``settings.output_dim`` head), built with ``nnx.eval_shape``: no files, no memory. With
    :func:`make_score_fn` it gives the planner the reward's shapes and FLOPs."""
    qwen = preset("qwen2-vl-2b", param_dtype=param_dtype, dtype=dtype, text_config={"vocab_size": vocab_size},
                  **overrides)
    cfg = VideoAlignConfig(qwen=qwen, output_dim=settings.output_dim)
    return nnx.split(abstract_model(VideoAlignModel, cfg))


# --------------------------------------------------------------------------------------------------
# In-graph preprocessing
# --------------------------------------------------------------------------------------------------
def preprocess_videos(videos: jax.Array, frame_indices: jax.Array | Sequence[int], size: Sequence[int], *,
                      patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                      quantize: bool = False) -> tuple[jax.Array, tuple[int, int, int]]:
    """Decoded clips (B, T, H, W, 3) in [0, 1] -> Qwen2-VL patches (B, t * h * w, 3 * tp * p * p)
    float32 and the grid (t, h, w).

    Frames ``frame_indices`` ((F,) or per clip (B, F)) are taken, resized to ``size`` with torch's
    antialiased bicubic (what ``torchvision.transforms.functional.resize(..., BICUBIC,
    antialias=True)`` computes; the identity when the size is unchanged), clamped to [0, 1]
    (``quantize=True`` also rounds to the 1/255 steps of the reference's uint8 frames), normalised
    with Qwen2-VL's mean / std, an odd frame count padded by repeating the last frame, and cut into
    patches in the processor's order (temporal patch, merge-block row, merge-block column, row and
    column inside the block; each patch flattened as (channel, frame, row, column))."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"VideoAlign: videos must be (B, T, H, W, 3), got {videos.shape}")
    x = videos.astype(jnp.float32)
    idx = jnp.asarray(frame_indices, jnp.int32)
    if idx.ndim == 1:
        frames = jnp.take(x, idx, axis=1)
    elif idx.ndim == 2 and idx.shape[0] in (1, x.shape[0]):
        idx = jnp.broadcast_to(idx, (x.shape[0], idx.shape[1]))
        frames = jnp.take_along_axis(x, idx[:, :, None, None, None], axis=1)
    else:
        raise ValueError(f"VideoAlign: frame_indices must be (F,) or (B, F) for {x.shape[0]} clips, got {idx.shape}")
    h, w = int(size[0]), int(size[1])
    f = patch_size * merge_size
    if h % f or w % f:
        raise ValueError(f"VideoAlign: resized size {(h, w)} must be a multiple of {f}")
    frames = jnp.clip(frames, 0.0, 1.0)
    if frames.shape[2:4] != (h, w):
        frames = jnp.clip(resize_bicubic_torch(frames, (h, w), antialias=True), 0.0, 1.0)
    if quantize:
        frames = jnp.round(frames * 255.0) / 255.0
    frames = (frames - jnp.asarray(QWEN2_VL_MEAN, jnp.float32)) / jnp.asarray(QWEN2_VL_STD, jnp.float32)
    b, n = frames.shape[:2]
    if n % temporal_patch_size:
        pad = temporal_patch_size - n % temporal_patch_size
        frames = jnp.concatenate([frames, jnp.repeat(frames[:, -1:], pad, axis=1)], axis=1)
        n += pad
    t, gh, gw, p, m = n // temporal_patch_size, h // patch_size, w // patch_size, patch_size, merge_size
    x = frames.reshape(b, t, temporal_patch_size, gh // m, m, p, gw // m, m, p, 3)
    # -> (B, t, block row, block col, row in block, col in block, channel, frame, pixel row, pixel col)
    x = x.transpose(0, 1, 3, 6, 4, 7, 9, 2, 5, 8)
    return x.reshape(b, t * gh * gw, 3 * temporal_patch_size * p * p), (t, gh, gw)


# --------------------------------------------------------------------------------------------------
# Weights: the PEFT state dict, LoRA merged, seen as a transformers Qwen2-VL checkpoint
# --------------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


def _released_name(key: str) -> str:
    """A PEFT / transformers-5 key -> the released Qwen2-VL layout (``visual.*``, ``model.*``)."""
    k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    if k.startswith("model.visual."):
        return k[len("model."):]
    if k.startswith("model.language_model."):
        return "model." + k[len("model.language_model."):]
    return k


class MergedCheckpoint(Mapping[str, np.ndarray]):
    """VideoAlign's weights as a released-layout Qwen2-VL state dict (+ ``rm_head.weight``): the
    reward tensors (PEFT names) over the base model's, each LoRA pair merged into its layer on
    access as ``W + scaling * B @ A`` (float32). ``lm_head`` is dropped (never read)."""

    def __init__(self, reward: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray] | None, *,
                 scaling: float, rank: int | None, where: str):
        self.where = where
        self.scaling = float(scaling)
        self._src: dict[str, tuple[Mapping[str, np.ndarray], str]] = {}
        pairs: dict[str, dict[str, str]] = {}
        for key in reward:
            k = _released_name(key)
            if "lora_embedding_" in k or "lora_magnitude" in k:
                raise CheckpointError(f"{where}: {key!r} is a LoRA variant this port does not merge (only Linear "
                                      "LoRA A / B)")
            m = _LORA_KEY.match(k)
            if m:
                pairs.setdefault(m["module"], {})[m["ab"]] = key
                continue
            if ".original_module." in k:
                continue  # superseded by the modules_to_save copy
            k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.replace(".base_layer.", "."))
            if k.startswith("lm_head."):
                continue
            if k in self._src:
                raise CheckpointError(f"{where}: two tensors map to {k!r} ({self._src[k][1]!r} and {key!r})")
            self._src[k] = (reward, key)
        self.reward_keys = set(self._src)
        if base is not None:
            for key in base:
                k = _released_name(key)
                if not k.startswith("lm_head.") and k not in self._src:
                    self._src[k] = (base, key)
        self.lora: dict[str, tuple[str, str]] = {}
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{where}: LoRA of {module!r} has only lora_{''.join(ab)} (needs A and B)")
            weight = module + ".weight"
            if weight not in self._src:
                raise CheckpointError(f"{where}: LoRA for {module!r} but no weight {weight!r} in the checkpoint or "
                                      "the base model")
            a_shape, b_shape = self._shape((reward, ab["A"])), self._shape((reward, ab["B"]))
            w_shape = self.shape(weight)
            r = a_shape[0]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != w_shape[1] or b_shape != (w_shape[0], r):
                raise CheckpointError(f"{where}: LoRA shapes of {module!r} do not fit its weight {w_shape}: lora_A "
                                      f"{a_shape} (r, in), lora_B {b_shape} (out, r)")
            if rank is not None and r != rank:
                raise CheckpointError(f"{where}: LoRA rank of {module!r} is {r}, the adapter config says r={rank}")
            self.lora[weight] = (ab["A"], ab["B"])
        self._reward = reward

    @staticmethod
    def _shape(ref) -> tuple[int, ...]:
        mapping, key = ref
        return tuple(mapping.shape(key)) if hasattr(mapping, "shape") else tuple(np.shape(mapping[key]))

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shape(self._src[key])

    def __getitem__(self, key: str) -> np.ndarray:
        mapping, src_key = self._src[key]
        w = np.asarray(mapping[src_key])
        if key not in self.lora:
            return w
        a_key, b_key = self.lora[key]
        a = np.asarray(self._reward[a_key], np.float32)
        b = np.asarray(self._reward[b_key], np.float32)
        return np.asarray(w, np.float32) + np.float32(self.scaling) * (b @ a)

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)


def _checkpoint_dir(folder: Path, step: int | None) -> Path:
    runs = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))
    if step is not None:
        want = folder / f"checkpoint-{int(step)}"
        if not want.is_dir():
            raise CheckpointError(f"no checkpoint-{step} in {folder} (have {[p.name for p in runs]})")
        return want
    return runs[-1] if runs else folder


def _open_reward_weights(ckpt: Path) -> tuple[Mapping[str, np.ndarray], str]:
    """(tensors, kind) with kind "full" or "adapter"."""
    if any((ckpt / f"model{s}").is_file() for s in (".safetensors", ".safetensors.index.json")):
        return open_checkpoint(ckpt, "model"), "full"
    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        tensors = dict(open_checkpoint(adapter).items())
        extra = ckpt / "non_lora_state_dict.safetensors"
        if extra.is_file():
            for k, v in open_checkpoint(extra).items():
                if k in tensors:
                    raise CheckpointError(f"{k!r} is in both {adapter.name} and {extra.name} ({ckpt})")
                tensors[k] = v
        return tensors, "adapter"
    pickles = [n for n in ("model.pth", "non_lora_state_dict.pth", "adapter_model.bin") if (ckpt / n).is_file()]
    if pickles:
        raise CheckpointError(f"{ckpt} holds only PyTorch pickles ({', '.join(pickles)}), which load without torch "
                              "only once converted: python -m vipo_jax.convert videoalign "
                              f"{ckpt} (vipo_jax.rewards.videoalign.convert_videoalign_checkpoint)")
    raise CheckpointError(f"no VideoAlign weights in {ckpt}: expected model.safetensors (the full PEFT state dict) "
                          "or adapter_model.safetensors (+ non_lora_state_dict.safetensors)")


def _lora_config(ckpt: Path, settings: VideoAlignSettings) -> tuple[float, int | None]:
    """(scaling, rank) from ``adapter_config.json`` when present, else ``model_config.json``."""
    path = ckpt / "adapter_config.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            r, alpha = int(d["r"]), float(d["lora_alpha"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"unreadable adapter config {path}: {e}") from e
        return alpha / (math.sqrt(r) if d.get("use_rslora") else r), r
    return settings.lora_scaling, settings.lora_r


def _base_folder(folder: Path, base: str | os.PathLike | None) -> Path:
    if base is not None:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"base model folder {path} has no config.json (expected a Qwen2-VL-2B-Instruct "
                                  "snapshot)")
        return path
    for cand in (folder / "base", folder):
        if (cand / "config.json").is_file():
            return cand
    raise CheckpointError(f"no base model for {folder}: pass base=<Qwen2-VL-2B-Instruct folder> or put it in "
                          f"{folder / 'base'} (its config.json and tokenizer are needed)")


def load_videoalign(folder: str | os.PathLike, *, base: str | os.PathLike | None = None, step: int | None = None,
                    param_dtype: Any = None, dtype: Any = None, sharding: ShardingFn | None = None,
                    **overrides: Any) -> tuple[VideoAlignModel, VideoAlignSettings, Path]:
    """Load a VideoAlign checkpoint folder (see the module docstring) with the LoRA merged.
    Returns ``(model, settings, checkpoint_dir)``. ``overrides``: Qwen2-VL runtime options
    (``remat``, ``attention``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"VideoAlign folder not found: {folder}")
    settings = VideoAlignSettings.from_folder(folder)
    ckpt = _checkpoint_dir(folder, step)
    base_dir = _base_folder(folder, base)
    reward, kind = _open_reward_weights(ckpt)
    where = str(ckpt)
    scaling, rank = _lora_config(ckpt, settings)
    base_tensors = open_weights(base_dir) if kind == "adapter" else None
    merged = MergedCheckpoint(reward, base_tensors, scaling=scaling, rank=rank, where=where)
    if settings.lora_enable and not merged.lora:
        raise CheckpointError(f"{where}: model_config.json enables LoRA but the weights hold no lora_A / lora_B "
                              "tensors (missing adapter?)")
    src = SourceKeys(merged, where=where)
    if "rm_head.weight" not in merged.reward_keys:
        raise CheckpointError(f"{where}: no rm_head.weight: not a VideoAlign reward checkpoint (the head is in "
                              "model.pth / non_lora_state_dict)")
    embed = "model.embed_tokens.weight"
    if embed not in src:
        raise CheckpointError(f"{where}: missing key {embed!r}")
    vocab = src.shape(embed)[0]  # VideoAlign resizes the embeddings to its tokenizer (151657 + 3 tokens)
    text_over = dict(overrides.pop("text_config", None) or {})
    text_over.setdefault("vocab_size", vocab)
    qcfg = Qwen2VLConfig.from_pretrained(base_dir, text_config=text_over,
                                         **dtype_overrides(overrides, param_dtype, dtype))
    if settings.lora_enable and settings.num_lora_modules == -1:
        want = {f"model.layers.{i}.{n}.weight" for i in range(qcfg.text_config.num_hidden_layers) for n in _LLM_LINEARS}
        missing = sorted(want - set(merged.lora))
        if missing:
            raise CheckpointError(f"{where}: no LoRA for {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                                  f"({len(missing)} of the {len(want)} language-model Linears VideoAlign adapts; "
                                  "truncated adapter?)")
    head_shape = src.shape("rm_head.weight")
    hidden = qcfg.text_config.hidden_size
    if head_shape != (settings.output_dim, hidden):
        raise CheckpointError(f"shape mismatch for 'rm_head.weight' in {where}: checkpoint has {head_shape}, "
                              f"model_config.json (output_dim {settings.output_dim}) and the base config (hidden "
                              f"{hidden}) expect {(settings.output_dim, hidden)}")
    head = linear(src.take("rm_head.weight"))
    params = {f"qwen.{k}": v for k, v in convert_hf(src, qcfg).items()}
    params["rm_head.kernel"] = head
    cfg = VideoAlignConfig(qwen=qcfg, output_dim=settings.output_dim)
    model = load_into(abstract_model(VideoAlignModel, cfg), params, where=where, sharding=sharding)
    return model, settings, ckpt


def convert_videoalign_checkpoint(path: str | os.PathLike) -> list[Path]:
    """The release's PyTorch pickles -> safetensors beside them, tensors and key names unchanged:
    ``model.pth`` -> ``model.safetensors``, ``non_lora_state_dict.pth`` ->
    ``non_lora_state_dict.safetensors``. ``path``: a ``checkpoint-N`` folder, the VideoAlign folder
    (every ``checkpoint-*`` in it), or one ``.pth`` file. Needs torch. Returns the files written."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        dirs = [p for p in sorted(path.glob("checkpoint-*")) if p.is_dir()] or [path]
        files = [d / n for d in dirs for n in ("model.pth", "non_lora_state_dict.pth") if (d / n).is_file()]
    else:
        raise CheckpointError(f"not found: {path}")
    if not files:
        raise CheckpointError(f"no model.pth / non_lora_state_dict.pth in {path}")
    out = []
    for f in files:
        tensors = load_torch_state_dict(f)
        dst = f.with_suffix(".safetensors")
        save_safetensors(dst, tensors, metadata={"format": "videoalign", "source": f.name})
        out.append(dst)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer and scorer
# --------------------------------------------------------------------------------------------------
def _load_tokenizer(tokenizer: Any, ckpt: Path, folder: Path, base_dir: Path) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for cand in (ckpt / "tokenizer", ckpt, folder / "tokenizer", base_dir):
        if (cand / "tokenizer_config.json").is_file() or (cand / "tokenizer.json").is_file():
            return load_tokenizer(cand)
    raise DataError(f"no tokenizer for {folder}: pass tokenizer=<folder> (the base model's, or the checkpoint's "
                    "tokenizer/)")


def prepare_tokenizer(tok: Any, cfg: Qwen2VLConfig) -> tuple[Any, tuple[int, int, int]]:
    """Add the reward tokens if missing (as VideoAlign's ``create_model_and_processor``) and check
    the token ids against the model. Returns ``(tokenizer, reward token ids)``."""
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        if len(missing) != len(SPECIAL_TOKENS):
            raise CheckpointError(f"the tokenizer has some reward tokens but not {missing}")
        tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    ids = tuple(int(i) for i in tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)))
    rows = cfg.text_config.vocab_size
    if len(tok) != rows:
        raise CheckpointError(f"the tokenizer has {len(tok)} tokens (reward tokens included) but the checkpoint's "
                              f"embeddings have {rows} rows: VideoAlign resizes them to its tokenizer (Qwen2-VL's "
                              "151657 + 3); wrong tokenizer?")
    for name, want in (("<|video_pad|>", cfg.video_token_id), ("<|vision_start|>", cfg.vision_start_token_id),
                       ("<|vision_end|>", cfg.vision_end_token_id)):
        got = tok.convert_tokens_to_ids(name)
        if got != want:
            raise CheckpointError(f"tokenizer id of {name} is {got}, the model config says {want}")
    return tok, ids


def make_score_fn(graphdef: nnx.GraphDef, settings: VideoAlignSettings, *, normalize: bool = True,
                  quantize: bool = True, clips_per_call: int = 0
                  ) -> Callable[[Any, jax.Array, Mapping[str, jax.Array]], jax.Array]:
    """``fn(params, videos, batch) -> (B, 3)`` float32 [VQ, MQ, TA] over ``nnx.split(model)``'s
    state: pure, jittable. ``videos`` (B, T, H, W, 3) in [0, 1]; ``batch`` the arrays of
    :meth:`VideoAlignScorer.tokenize` (one row per clip, or one row for all). ``normalize``:
    VideoAlign's ``use_norm=True`` z-scoring with the checkpoint's means / stds. ``quantize``: round
    the resized frames to the 1/255 levels of the reference's uint8 frames (no gradient through
    the pixels; ``False`` keeps them float, differentiable, half a level off at most).
    ``clips_per_call``: score that many clips at a time (a ``lax.map`` over chunks of the batch,
    bounding activation memory; 0: all at once); it must divide B."""
    mean = std = None
    if normalize and settings.mean is not None:
        mean, std = jnp.asarray(settings.mean, jnp.float32), jnp.asarray(settings.std, jnp.float32)

    def run(model, videos, rows):
        v = model.config.qwen.vision_config
        h, w = videos.shape[2:4]
        size = smart_resize(h, w, factor=v.patch_size * v.spatial_merge_size, min_pixels=settings.min_pixels,
                            max_pixels=settings.max_pixels)
        patches, grid = preprocess_videos(videos, rows["frame_indices"], size, patch_size=v.patch_size,
                                          merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                                          quantize=quantize)
        raw = model(patches.astype(jnp.dtype(v.dtype)), grid, rows["input_ids"], rows["reward_positions"],
                    rows.get("attention_mask"))
        return raw if mean is None else (raw - mean) / std

    def fn(params, videos, batch):
        model = nnx.merge(graphdef, params)
        b = videos.shape[0]
        keys = ["input_ids", "reward_positions", "frame_indices"]
        if batch.get("attention_mask") is not None:
            keys.append("attention_mask")
        rows = {}
        for k in keys:
            a = jnp.asarray(batch[k])
            if a.shape[0] not in (1, b):
                raise ValueError(f"VideoAlign: batch[{k!r}] has {a.shape[0]} rows for {b} clips")
            rows[k] = jnp.broadcast_to(a, (b, *a.shape[1:]))
        c = b if clips_per_call in (0, None) or clips_per_call >= b else int(clips_per_call)
        if b % c:
            raise ValueError(f"VideoAlign: clips_per_call={clips_per_call} must divide the {b} clips")
        if c == b:
            return run(model, videos, rows)
        chunks = jax.tree.map(lambda a: a.reshape(b // c, c, *a.shape[1:]), (videos, rows))
        return jax.lax.map(lambda xs: run(model, *xs), chunks).reshape(b, 3)

    return fn


class VideoAlignScorer:
    """A loaded VideoAlign with its tokenizer and settings.

    ``scorer = VideoAlignScorer.from_folder(folder)``; per prompt, once:
    ``batch = scorer.tokenize(prompts, num_frames, height, width, fps)``; inside a jitted step:
    ``scorer.score_fn(scorer.params, videos, batch) -> (B, 3)`` [VQ, MQ, TA]."""

    def __init__(self, model: VideoAlignModel, tokenizer: Any, settings: VideoAlignSettings, *,
                 normalize: bool = True, quantize: bool = True, clips_per_call: int = 0,
                 max_prompt_tokens: int = 256):
        self.cfg = model.config
        self.settings = settings
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.reward_token_ids = prepare_tokenizer(tokenizer, self.cfg.qwen)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.score_fn = make_score_fn(self.graphdef, settings, normalize=normalize, quantize=quantize,
                                      clips_per_call=clips_per_call)
        self._jit = jax.jit(self.score_fn)
        self._fixed_length: dict[int, int] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, base: str | os.PathLike | None = None,
                    tokenizer: str | os.PathLike | Any = None, step: int | None = None, param_dtype: Any = None,
                    dtype: Any = None, sharding: Any = None, normalize: bool = True, quantize: bool = True,
                    clips_per_call: int = 0, max_prompt_tokens: int = 256, **overrides: Any) -> VideoAlignScorer:
        """Load a VideoAlign folder (module docstring). ``dtype`` / ``param_dtype``: compute and
        weight dtypes (``"bfloat16"`` as the reference runs it; float32 by default);
        ``normalize`` / ``quantize`` / ``clips_per_call``: see :func:`make_score_fn`;
        ``max_prompt_tokens``: the prompt budget of :meth:`default_length`; ``overrides``: ``remat``
        / ``attention``."""
        folder = Path(folder)
        model, settings, ckpt = load_videoalign(folder, base=base, step=step, param_dtype=param_dtype, dtype=dtype,
                                                sharding=sharding, **overrides)
        tok = _load_tokenizer(tokenizer, ckpt, folder, _base_folder(folder, base))
        return cls(model, tok, settings, normalize=normalize, quantize=quantize, clips_per_call=clips_per_call,
                   max_prompt_tokens=max_prompt_tokens)

    def layout(self, num_frames: int, height: int, width: int, fps: float) -> VideoLayout:
        return video_layout(num_frames, height, width, fps, self.settings, self.cfg.qwen.vision_config)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def default_length(self, num_video_tokens: int) -> int:
        """Template + video tokens + ``max_prompt_tokens``, rounded up to a multiple of 64."""
        if num_video_tokens not in self._fixed_length:
            self._fixed_length[num_video_tokens] = len(self._encode(build_chat_text("", num_video_tokens)))
        return -(-(self._fixed_length[num_video_tokens] + self.max_prompt_tokens) // 64) * 64

    def input_specs(self, num_frames: int, height: int, width: int, fps: float, *,
                    max_length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """The row shapes of :meth:`tokenize`'s arrays for clips of that shape (int32 each)."""
        lay = self.layout(num_frames, height, width, fps)
        length = int(max_length) if max_length else self.default_length(lay.num_video_tokens)
        return {"input_ids": jax.ShapeDtypeStruct((length,), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((length,), jnp.int32),
                "reward_positions": jax.ShapeDtypeStruct((3,), jnp.int32),
                "frame_indices": jax.ShapeDtypeStruct((len(lay.frame_indices),), jnp.int32)}

    def tokenize(self, prompts: str | Sequence[str], num_frames: int, height: int, width: int, fps: float, *,
                 max_length: int | None = None) -> dict[str, np.ndarray]:
        """Per-prompt arrays for clips of ``num_frames`` x ``height`` x ``width`` at ``fps``:
        ``input_ids`` / ``attention_mask`` int32 (P, L) (right-padded with the pad token),
        ``reward_positions`` int32 (P, 3) (positions of the VQ, MQ, TA tokens) and ``frame_indices``
        int32 (P, F) (the sampled frames, the same row for every prompt). ``L`` is ``max_length`` or
        :meth:`default_length`; a longer prompt raises :class:`DataError` (the reference never
        truncates)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DataError("VideoAlign tokenize: prompts must be a non-empty list of strings")
        lay = self.layout(num_frames, height, width, fps)
        length = int(max_length) if max_length else self.default_length(lay.num_video_tokens)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.convert_tokens_to_ids("<|endoftext|>") if pad is None else pad
        vid = self.cfg.qwen.video_token_id
        out = {"input_ids": np.full((len(prompts), length), pad, np.int32),
               "attention_mask": np.zeros((len(prompts), length), np.int32),
               "reward_positions": np.zeros((len(prompts), 3), np.int32),
               "frame_indices": np.tile(np.asarray(lay.frame_indices, np.int32), (len(prompts), 1))}
        for i, prompt in enumerate(prompts):
            ids = np.asarray(self._encode(build_chat_text(prompt, lay.num_video_tokens)), np.int64)
            if len(ids) > length:
                raise DataError(f"VideoAlign: prompt {i} needs {len(ids)} tokens with the template and "
                                f"{lay.num_video_tokens} video tokens; max_length is {length} (raise max_length or "
                                "max_prompt_tokens)")
            if int((ids == vid).sum()) != lay.num_video_tokens:
                raise DataError(f"VideoAlign: prompt {i} tokenizes to {int((ids == vid).sum())} video tokens, "
                                f"expected {lay.num_video_tokens} (does the prompt contain <|video_pad|>?)")
            for j, tid in enumerate(self.reward_token_ids):
                where = np.nonzero(ids == tid)[0]
                if len(where) != 1:
                    raise DataError(f"VideoAlign: prompt {i} holds {SPECIAL_TOKENS[j]} {len(where)} times (the "
                                    "template has it once; does the prompt contain it?)")
                out["reward_positions"][i, j] = where[0]
            out["input_ids"][i, :len(ids)] = ids
            out["attention_mask"][i, :len(ids)] = 1
        return out

    def score(self, videos: jax.Array | np.ndarray, prompts: str | Sequence[str], fps: float) -> np.ndarray:
        """[VQ, MQ, TA] of each clip (B, T, H, W, 3) in [0, 1] with its prompt (or one for all),
        numpy (B, 3). Jitted per shape."""
        videos = jnp.asarray(videos)
        _, t, h, w, _ = videos.shape
        batch = self.tokenize(prompts, t, h, w, fps)
        return np.asarray(self._jit(self.params, videos, {k: jnp.asarray(v) for k, v in batch.items()}))


# --------------------------------------------------------------------------------------------------
# Registry entries: videoalign_vq, videoalign_mq, videoalign_ta (one model, three heads)
# --------------------------------------------------------------------------------------------------
VIDEOALIGN_HELP = """\
VideoAlign not found: --config.rewards.videoalign={folder!r}. The paper's Wan2.1 reward is VideoAlign
(visual quality VQ + motion quality MQ, 1:1). Download it and its base model, e.g.
    huggingface-cli download KlingTeam/VideoReward --local-dir /data/VideoReward
    huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir /data/VideoReward/base
convert the pickled weights once (needs torch):
    python -m vipo_jax.convert videoalign /data/VideoReward
and pass --config.rewards.videoalign=/data/VideoReward. Without it, train with a per-frame image reward:
--config.rewards.names=hpsv21 --config.rewards.coefs=1.0 (see docs/VIDEOALIGN.md)."""
#: The prompt length the planner assumes (template + video tokens + prompt; the real tokenizer gives
#: about 800-1000 with Wan's 405 video tokens).
PLANNED_PROMPT_TOKENS = 1024
_INPUTS = ("input_ids", "attention_mask", "reward_positions", "frame_indices")


def _check(ctx: RewardContext) -> None:
    folder = str(ctx.config.rewards.get("videoalign", "") or "")
    if not folder or not Path(folder).is_dir():
        raise CheckpointError(VIDEOALIGN_HELP.format(folder=folder))


def _fps(c: Any) -> float:
    """The frame rate VideoAlign reads the clips at (it samples 2 frames per second of it):
    ``rewards.videoalign_fps``, or the generation's ``sampling.fps`` when 0."""
    return float(c.rewards.get("videoalign_fps", 0.0) or c.sampling.fps)


def _load_model(ctx: RewardContext) -> tuple[Callable, Any, Callable | None, dict]:
    """(score_fn, params, prompt_inputs, input_specs) of the one VideoAlign model of a world."""
    if "videoalign" in ctx.cache:
        return ctx.cache["videoalign"]
    c = ctx.config
    s = c.sampling
    per_call = int(c.rewards.get("videoalign_clips_per_call", 0) or 0)
    if ctx.source in ("abstract", "random"):
        graphdef, params = abstract_videoalign(param_dtype=ctx.dtype, dtype=ctx.dtype)
        if ctx.source == "random":
            model = init_model(VideoAlignModel, nnx.merge(graphdef, params).config, abstract=False)
            graphdef, params = nnx.split(model)
        settings = RELEASE_SETTINGS
        lay = video_layout(s.num_frames, s.height, s.width, _fps(c), settings, preset("qwen2-vl-2b").vision_config)
        n = PLANNED_PROMPT_TOKENS
        specs = {"input_ids": (n,), "attention_mask": (n,), "reward_positions": (3,),
                 "frame_indices": (len(lay.frame_indices),)}
        specs = {f"videoalign_{k}": jax.ShapeDtypeStruct(v, jnp.int32) for k, v in specs.items()}
        out = (make_score_fn(graphdef, settings, clips_per_call=per_call), params, None, specs)
    else:
        _check(ctx)
        base = str(c.rewards.get("videoalign_base", "") or "") or None
        scorer = VideoAlignScorer.from_folder(c.rewards.videoalign, base=base, param_dtype=ctx.dtype, dtype=ctx.dtype,
                                              sharding=ctx.sharding, clips_per_call=per_call)

        def prompt_inputs(texts: list[str]) -> dict[str, np.ndarray]:
            rows = scorer.tokenize(texts, s.num_frames, s.height, s.width, _fps(c))
            return {f"videoalign_{k}": v for k, v in rows.items()}

        specs = {f"videoalign_{k}": v for k, v in
                 scorer.input_specs(s.num_frames, s.height, s.width, _fps(c)).items()}
        out = (scorer.score_fn, scorer.params, prompt_inputs, specs)
    ctx.cache["videoalign"] = out
    return out


def _loader(index: int) -> Callable:
    def load(ctx: RewardContext) -> LoadedReward:
        score_fn, params, prompt_inputs, specs = _load_model(ctx)

        def score(p: Any, videos: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
            rows = {k: batch[f"videoalign_{k}"] for k in _INPUTS}
            return score_fn(p, videos, rows)[:, index]

        return LoadedReward(score=score, video_score=score, params=params, prompt_inputs=prompt_inputs,
                            input_specs=specs, params_key="reward/videoalign")

    return load


for _i, _dim in enumerate(DIMENSIONS):
    register(RewardEntry(
        f"videoalign_{_dim.lower()}", _loader(_i),
        f"VideoAlign {_dim} ({dict(VQ='visual', MQ='motion', TA='text-alignment')[_dim]} quality; the paper's Wan "
        "reward is VQ + MQ, 1:1); --config.rewards.videoalign=<KlingTeam/VideoReward folder>",
        reads="videos", sources=("toy", "pretrained", "random", "abstract"), path_key="videoalign", check=_check))
