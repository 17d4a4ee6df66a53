"""Configuration of the Wan2.1 text-to-video DiT (diffusers ``WanTransformer3DModel``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import ConfigError
from vipo_jax.models.config_io import normalize_runtime, pick_fields, read_config_json

CLASS_NAME = "WanTransformer3DModel"

#: Wan's default negative prompt (Wan2.1 ``sample_neg_prompt``), the one the ViPO Wan script trains
#: with. diffusers' WanPipeline uses "" when none is given and shows an English rendering of this one
#: in its example.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Field names and defaults are those of diffusers' ``WanTransformer3DModel`` (its defaults are
    the 14B sizes); the last four are runtime options (parameter dtype, compute dtype, remat policy
    name, attention kernel name).

    ``qk_norm`` is kept for completeness but, as in diffusers, does not change the model: every
    attention applies an RMSNorm over all heads (``rms_norm_across_heads``) to q and k.
    ``image_dim`` / ``added_kv_proj_dim`` / ``pos_embed_seq_len`` belong to image-conditioned
    variants (I2V, FLF2V) and must stay unset: this port is text-to-video only.
    """

    patch_size: tuple[int, ...] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None
    # runtime options
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    # Constant of the architecture (not in config.json).
    rope_theta = 10000.0

    def __post_init__(self):
        try:
            patch = tuple(int(p) for p in self.patch_size)
        except TypeError:
            raise ConfigError(f"WanConfig.patch_size must be 3 integers, got {self.patch_size!r}") from None
        object.__setattr__(self, "patch_size", patch)
        normalize_runtime(self, "WanConfig")
        conditioned = {k: getattr(self, k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                       if getattr(self, k) is not None}
        if conditioned:
            raise ConfigError(
                f"WanConfig: {conditioned} set: this is an image-conditioned Wan transformer (I2V / FLF2V); "
                "only the text-to-video Wan2.1 DiT is supported (image_dim, added_kv_proj_dim and "
                "pos_embed_seq_len must be null)"
            )
        if len(patch) != 3 or min(patch) < 1:
            raise ConfigError(f"WanConfig.patch_size must be 3 positive integers (t, h, w), got {patch}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim",
                     "ffn_dim", "rope_max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"WanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ConfigError(f"WanConfig.num_layers must be >= 0, got {self.num_layers}")
        if self.out_channels is not None and self.out_channels < 1:
            raise ConfigError(f"WanConfig.out_channels must be >= 1 or null, got {self.out_channels}")
        if self.attention_head_dim % 2:
            raise ConfigError(f"WanConfig.attention_head_dim must be even (RoPE), got {self.attention_head_dim}")
        if self.freq_dim % 2:
            raise ConfigError(f"WanConfig.freq_dim must be even, got {self.freq_dim}")

    # Derived sizes.
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        """Channels of ``proj_out``: one token's patch, ordered ``(p_t, p_h, p_w, out_channels)``."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * (self.out_channels or self.in_channels)

    @property
    def rope_axes_dims(self) -> tuple[int, int, int]:
        """Channels of each head given to the (frame, height, width) rotary axes, as in diffusers:
        height and width get ``2 * (head_dim // 6)`` each, frames the rest."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    def replace(self, **changes: Any) -> WanConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> WanConfig:
        """From a diffusers ``config.json`` dict; unknown keys of ``d`` are ignored, unknown
        ``overrides`` refused. ``None`` keeps the default, except for the fields whose default is
        ``None`` (so an I2V file's ``image_dim`` is seen, and a null ``out_channels`` kept)."""
        keep = ("out_channels", "qk_norm", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
        return cls(**pick_fields(cls, d, overrides, keep_none=keep))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> WanConfig:
        """Read ``config.json`` of a diffusers transformer folder or of a pipeline root's
        ``transformer/`` subfolder; another class's config is refused."""
        d = read_config_json(folder, subfolders=("transformer",), class_names=(CLASS_NAME,),
                             what="diffusers Wan transformer folder")
        return cls.from_dict(d, **overrides)


# Real Wan2.1 T2V sizes (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers transformer/config.json).
PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(num_layers=30, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960),
    "wan2.1-t2v-14b": WanConfig(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824),
}


def preset(name: str, **overrides: Any) -> WanConfig:
    """A preset's config with some fields replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}")
    return WanConfig.from_dict(dataclasses.asdict(PRESETS[name]), **overrides)
