"""CLIP configurations, with the field names of transformers' ``config.json`` (``CLIPTextConfig``,
``CLIPVisionConfig``, ``CLIPConfig``), plus runtime options and two switches that open_clip
checkpoints need: ``hidden_act="gelu"`` (open_clip's ``nn.GELU``, exact erf form) and the text
``pooling`` rule. :func:`config_from_open_clip` maps an open_clip model config
(``open_clip/model_configs/*.json``) onto these classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.config_io import RUNTIME_FIELDS, normalize_runtime, pick_fields, read_config_json

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
# "auto" is transformers' rule: argmax of the token ids when eos_token_id == 2 (legacy configs
# from before transformers PR #24773, e.g. openai/clip-vit-large-patch14 used by FLUX), else the
# first position of eos_token_id. "argmax" is open_clip's default (EOT has the largest id).
POOLING = ("auto", "argmax", "eos", "first", "last")


def _check_tower(cfg: Any, what: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{what}: hidden_size {cfg.hidden_size} is not a multiple of "
                          f"num_attention_heads {cfg.num_attention_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"{what}.hidden_act {cfg.hidden_act!r} is not supported; choose one of "
                          f"{ACTIVATIONS}")
    normalize_runtime(cfg, what)


def _pick(cls, d: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    # A null in config.json means "unset" (take the default), except for token ids, where None is a value.
    token_ids = [f.name for f in dataclasses.fields(cls) if f.name.endswith("_token_id")]
    return pick_fields(cls, d, overrides, keep_none=token_ids)


class _Tower:
    """Shared helpers of the text and vision configs."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any):
        return cls(**_pick(cls, d, overrides))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any):
        """Read ``config.json``; a full ``CLIPConfig`` file contributes its ``text_config`` /
        ``vision_config``."""
        d = read_config_json(folder, what="transformers CLIP model folder")
        sub = cls._sub_key  # type: ignore[attr-defined]
        if isinstance(d.get(sub), Mapping):
            d = d[sub]
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (a ``config.json``); runtime options are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Tower):
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    pooling: str = "auto"
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    _sub_key = "text_config"

    def __post_init__(self):
        eos = self.eos_token_id
        if isinstance(eos, list | tuple):
            if len(eos) != 1:
                raise ConfigError(f"CLIPTextConfig: a single eos_token_id is needed, got {eos}")
            object.__setattr__(self, "eos_token_id", int(eos[0]))
        if self.pooling not in POOLING:
            raise ConfigError(f"CLIPTextConfig.pooling must be one of {POOLING}, got {self.pooling!r}")
        if self.pooling in ("auto", "eos") and self.eos_token_id is None:
            raise ConfigError(f"CLIPTextConfig.pooling={self.pooling!r} needs eos_token_id")
        _check_tower(self, "CLIPTextConfig")

    @property
    def pooling_rule(self) -> str:
        """The concrete rule: "argmax", "eos", "first" or "last"."""
        if self.pooling == "auto":
            return "argmax" if self.eos_token_id == 2 else "eos"
        return self.pooling


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_Tower):
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    _sub_key = "vision_config"

    def __post_init__(self):
        for name in ("image_size", "patch_size"):
            v = getattr(self, name)
            if isinstance(v, list | tuple):
                if len(set(v)) != 1:
                    raise ConfigError(f"CLIPVisionConfig.{name}: only square sizes are supported, got {v}")
                object.__setattr__(self, name, int(v[0]))
        if self.image_size % self.patch_size:
            raise ConfigError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")
        _check_tower(self, "CLIPVisionConfig")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        normalize_runtime(self, "CLIPConfig")
        # The towers run with the model's runtime options.
        rt = {k: getattr(self, k) for k in RUNTIME_FIELDS}
        object.__setattr__(self, "text_config", self.text_config.replace(**rt))
        object.__setattr__(self, "vision_config", self.vision_config.replace(**rt))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
        """From a transformers ``CLIPConfig`` dict, or an open_clip model config (recognised by
        its ``vision_cfg`` key). ``overrides`` may hold top-level fields, runtime options, and
        ``text_config`` / ``vision_config`` dicts merged into the towers' fields."""
        if "vision_cfg" in d or "text_cfg" in d:
            return config_from_open_clip(d, **overrides)
        overrides = dict(overrides)
        towers = {}
        for key, tower in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            sub = dict(d.get(key) or {})
            sub.update(d.get(f"{key}_dict") or {})  # older transformers files; wins like in HF
            extra = overrides.pop(key, None) or {}
            if isinstance(extra, CLIPTextConfig | CLIPVisionConfig):
                extra = dataclasses.asdict(extra)
            sub.update(extra)
            towers[key] = tower.from_dict({k: v for k, v in sub.items() if k not in RUNTIME_FIELDS})
        kw = _pick(cls, {k: v for k, v in d.items() if k not in ("text_config", "vision_config")},
                   overrides)
        return cls(**towers, **kw)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> CLIPConfig:
        d = read_config_json(folder, what="transformers CLIP model folder")
        if "vision_cfg" not in d and "vision_config" not in d:
            raise CheckpointError(f"{folder}: config.json is not a full CLIP model config "
                                  f"(model_type {d.get('model_type')!r}); load a text encoder with "
                                  "from_pretrained(folder, component='text')")
        return cls.from_dict(d, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A transformers-style ``config.json`` dict (runtime options left out)."""
        return {"model_type": "clip", "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict(), "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value}

    def replace(self, **kw: Any) -> CLIPConfig:
        return dataclasses.replace(self, **kw)


# open_clip options we do not implement; a config that sets them to a non-default value is refused
# rather than silently loaded into the wrong architecture.
_OC_VISION_DEFAULTS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "act_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    "timm_model_name": None,
}
_OC_TEXT_DEFAULTS = {
    "ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
    "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "hf_model_name": None,
}


def _oc_eps(sub: Mapping[str, Any], what: str) -> float:
    norm = dict(sub.get("norm_kwargs") or {})
    eps = float(norm.pop("eps", 1e-5))
    if norm:
        raise ConfigError(f"open_clip {what}.norm_kwargs {sorted(norm)} not supported")
    return eps


def _oc_check(sub: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> None:
    for k, default in defaults.items():
        v = sub.get(k, default)
        if v != default and (v or default):  # None / False / {} / 0 all mean "off"
            raise ConfigError(f"open_clip {what}.{k}={sub.get(k)!r} is not supported by this CLIP port")


def config_from_open_clip(oc: Mapping[str, Any], **overrides: Any) -> CLIPConfig:
    """Map an open_clip model config (e.g. ``model_configs/ViT-H-14.json``: ``embed_dim``,
    ``vision_cfg``, ``text_cfg``, ``quick_gelu``) to a :class:`CLIPConfig`.

    open_clip builds its towers with ``nn.GELU`` unless ``quick_gelu`` is set, a causal mask with
    no padding mask, and pools text at ``argmax(token ids)`` (``pool_type="argmax"``; ``"eos"``
    pools at the first ``eos_id``). Options this port does not implement raise ConfigError."""
    try:
        embed_dim = int(oc["embed_dim"])
        vc = dict(oc["vision_cfg"])
        tc = dict(oc["text_cfg"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"not an open_clip model config (needs embed_dim, vision_cfg, text_cfg): {e}") \
            from e
    if oc.get("init_logit_bias") is not None:
        raise ConfigError("open_clip init_logit_bias (SigLIP-style models) is not supported")
    if not isinstance(vc.get("layers", 12), int):
        raise ConfigError("open_clip ModifiedResNet vision towers are not supported (ViT only)")
    _oc_check(vc, _OC_VISION_DEFAULTS, "vision_cfg")
    _oc_check(tc, _OC_TEXT_DEFAULTS, "text_cfg")
    act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"

    v_width = int(vc.get("width", 768))
    head_width = int(vc.get("head_width", 64))
    vision = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * float(vc.get("mlp_ratio", 4.0))),
        projection_dim=embed_dim, num_hidden_layers=int(vc.get("layers", 12)),
        num_attention_heads=v_width // head_width, image_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 16), hidden_act=act, layer_norm_eps=_oc_eps(vc, "vision_cfg"))

    t_width = int(tc.get("width", 512))
    pool = tc.get("pool_type", "argmax")
    if pool not in ("argmax", "eos", "first", "last"):
        raise ConfigError(f"open_clip text_cfg.pool_type={pool!r} is not supported")
    text = CLIPTextConfig(
        vocab_size=int(tc.get("vocab_size", 49408)), hidden_size=t_width,
        intermediate_size=int(t_width * float(tc.get("mlp_ratio", 4.0))), projection_dim=embed_dim,
        num_hidden_layers=int(tc.get("layers", 12)), num_attention_heads=int(tc.get("heads", 8)),
        max_position_embeddings=int(tc.get("context_length", 77)), hidden_act=act,
        layer_norm_eps=_oc_eps(tc, "text_cfg"), pad_token_id=int(tc.get("pad_id", 0)),
        bos_token_id=None, eos_token_id=int(tc.get("eos_id", 2)), pooling=pool)

    overrides = dict(overrides)
    text = text.replace(**dict(overrides.pop("text_config", None) or {}))
    vision = vision.replace(**dict(overrides.pop("vision_config", None) or {}))
    kw = _pick(CLIPConfig, {}, overrides)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=math.log(1 / 0.07), **kw)


# open_clip's model_configs/ViT-H-14.json (the HPSv2 / HPSv2.1 architecture), embedded so that the
# conversion needs neither open_clip nor network access.
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
}
