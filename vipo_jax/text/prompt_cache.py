"""Prompt embeddings computed once and cached on disk, so training runs without the text encoders.

:class:`PromptEncoder` holds the T5 encoder, the CLIP text model and their tokenizers and maps a
list of prompts to ``(t5_embeds (B, L, D), pooled (B, P))`` exactly as diffusers' FluxPipeline does
(no attention mask for either encoder; CLIP's pooled output). :func:`build_cache` stores the result
for a prompt set as a safetensors file whose metadata holds a hash of the prompt list and a
fingerprint of the encoders (weights sample, configs, tokenizers, lengths); :func:`load_cache`
refuses a cache built for another prompt list (or, when given the encoder, another encoder).

The CLIP model is duck-typed: any callable ``clip(input_ids) -> (hidden, pooled)`` works (an
``nnx.Module`` is jitted with its weights as arguments). It may be ``None`` for pipelines that use
the T5 / UMT5 alone (Wan2.1); the cache then has no ``pooled``. :meth:`PromptEncoder.from_wan`
encodes as diffusers' WanPipeline does: cleaned prompts, UMT5 with its attention mask, and the
hidden states beyond each prompt's length replaced by zero vectors (512 positions in all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError, DataError
from vipo_jax.models.clip import from_pretrained as load_clip
from vipo_jax.models.t5 import from_pretrained as load_t5_encoder
from vipo_jax.text.tokenizers import CLIP_MAX_LENGTH, load_flux_tokenizers, load_tokenizer, t5_max_length, tokenize
from vipo_jax.weights.safetensors_io import SafetensorsFile, save_safetensors

log = logging.getLogger(__name__)

CACHE_FORMAT = "vipo_jax.prompt_cache/1"
_SAMPLES_PER_LEAF = 4096


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    if isinstance(prompts, str):
        raise DataError(f"{what}: expected a list of prompts, got a single string")
    prompts = list(prompts)
    if not prompts:
        raise DataError(f"{what}: the prompt list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise DataError(f"{what}: prompt {i} is a {type(p).__name__}, not a string")
    return prompts


def prompts_hash(prompts: Sequence[str]) -> str:
    """sha256 of the ordered prompt list."""
    blob = json.dumps(list(prompts), ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _as_pure(model: Any) -> tuple[Callable[..., Any], Any]:
    """``(fn(state, *args), state)``: nnx modules are split so jit sees their weights as arguments
    (not baked-in constants); other callables are closed over."""
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return (lambda st, *a: nnx.merge(graphdef, st)(*a)), state
    return (lambda st, *a: model(*a)), None


def _module_fingerprint(h: Any, name: str, model: Any) -> None:
    """Feed a model's identity into ``h``: its config and, for nnx modules, every variable's path,
    shape, dtype and a strided sample of its values (bit-exact; cheap even for T5-XXL)."""
    h.update(f"[{name}] {type(model).__module__}.{type(model).__qualname__}\n".encode())
    cfg = getattr(model, "cfg", getattr(model, "config", None))
    if cfg is not None:
        h.update(repr(cfg).encode())
    if not isinstance(model, nnx.Module):
        return
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        key = ".".join(str(p) for p in path)
        h.update(f"{key} {tuple(np.shape(x))} {np.dtype(x.dtype)}\n".encode())
        shape = np.shape(x)
        if shape and 0 not in shape:
            # a strided grid of about _SAMPLES_PER_LEAF values; slicing per axis (no reshape) keeps
            # a sharded weight from being gathered whole
            per_axis = math.ceil(_SAMPLES_PER_LEAF ** (1 / len(shape)))
            x = x[tuple(slice(None, None, max(1, n // per_axis)) for n in shape)]
        h.update(np.asarray(x).tobytes())


def _tokenizer_fingerprint(h: Any, name: str, tok: Any) -> None:
    h.update(f"[{name}] {type(tok).__qualname__} {len(tok)} {getattr(tok, 'padding_side', '')} "
             f"{getattr(tok, 'truncation_side', '')}\n".encode())
    h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tok, "special_tokens_map", {}), sort_keys=True, default=str).encode())


def wan_prompt_clean(text: str) -> str:
    """diffusers' WanPipeline ``prompt_clean``: ftfy (when installed), HTML unescaping twice, and
    every whitespace run collapsed to one space."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptEncoder:
    """Tokenize and encode prompts in fixed-size jitted batches (one compile for any prompt count).

    ``t5_attention_mask=False`` matches FluxPipeline (the T5 sees its padding); set it for
    pipelines that pass the mask (Wan2.1's UMT5). ``zero_pad=True`` replaces the states after each
    prompt's tokens by zero vectors (WanPipeline cuts each prompt at its length and pads with zeros);
    ``clean`` rewrites every prompt before tokenization (WanPipeline's ``prompt_clean``)."""

    def __init__(self, t5: Any, clip: Any | None, t5_tokenizer: Any, clip_tokenizer: Any | None = None, *,
                 t5_max_length: int = 512, clip_max_length: int = CLIP_MAX_LENGTH, batch_size: int = 8,
                 t5_attention_mask: bool = False, zero_pad: bool = False,
                 clean: Callable[[str], str] | None = None):
        if (clip is None) != (clip_tokenizer is None):
            raise DataError("PromptEncoder: give both the CLIP model and its tokenizer, or neither")
        if batch_size <= 0:
            raise DataError(f"PromptEncoder: batch_size must be positive, got {batch_size}")
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.t5_max_length, self.clip_max_length = int(t5_max_length), int(clip_max_length)
        self.batch_size = int(batch_size)
        self.t5_attention_mask = bool(t5_attention_mask)
        self.zero_pad = bool(zero_pad)
        self.clean = clean
        self._fingerprint: str | None = None

        t5_fn, self._t5_state = _as_pure(t5)
        clip_fn, self._clip_state = _as_pure(clip) if clip is not None else (None, None)
        use_mask, zero_pad = self.t5_attention_mask, self.zero_pad

        def run(t5_state, clip_state, t5_ids, t5_mask, clip_ids):
            embeds = t5_fn(t5_state, t5_ids, t5_mask if use_mask else None)
            if zero_pad:
                embeds = jax.numpy.where(t5_mask[..., None] > 0, embeds, 0).astype(embeds.dtype)
            pooled = clip_fn(clip_state, clip_ids)[1] if clip_fn is not None else None
            return embeds, pooled

        self._run = jax.jit(run)

    @classmethod
    def from_flux(cls, root: str | os.PathLike, variant: str = "dev", *, param_dtype: Any = "bfloat16",
                  dtype: Any = "bfloat16", batch_size: int = 8,
                  max_sequence_length: int | None = None) -> PromptEncoder:
        """The text side of a diffusers FLUX.1 folder: ``text_encoder`` (CLIP), ``text_encoder_2``
        (T5-XXL), ``tokenizer``, ``tokenizer_2``; T5 length ``max_sequence_length`` (FluxPipeline's
        argument of that name), default 512 (dev) or 256 (schnell)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"FLUX.1 folder not found: {root}")
        max_len = t5_max_length(variant)
        if max_sequence_length is not None:
            if not 1 <= int(max_sequence_length) <= 512:
                raise DataError(f"max_sequence_length must be in 1..512 (as in FluxPipeline), "
                                f"got {max_sequence_length}")
            max_len = int(max_sequence_length)
        clip_tok, t5_tok = load_flux_tokenizers(root)
        t5 = load_t5_encoder(root / "text_encoder_2", param_dtype=param_dtype, dtype=dtype)
        clip = load_clip(root / "text_encoder", param_dtype=param_dtype, dtype=dtype, component="text")
        clip_len = min(CLIP_MAX_LENGTH, int(getattr(clip_tok, "model_max_length", CLIP_MAX_LENGTH)))
        return cls(t5, clip, t5_tok, clip_tok, t5_max_length=max_len, clip_max_length=clip_len,
                   batch_size=batch_size)

    @classmethod
    def from_wan(cls, root: str | os.PathLike, *, param_dtype: Any = "bfloat16", dtype: Any = "bfloat16",
                 batch_size: int = 8, max_sequence_length: int = 512) -> PromptEncoder:
        """The text side of a diffusers Wan2.1 folder: ``text_encoder`` (UMT5-XXL) and ``tokenizer``,
        encoding as WanPipeline does (``max_sequence_length`` 512, attention mask, zero padding after
        each prompt, ``prompt_clean``)."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Wan2.1 folder not found: {root}")
        if not 1 <= int(max_sequence_length) <= 512:
            raise DataError(f"max_sequence_length must be in 1..512 (WanPipeline uses 512), got {max_sequence_length}")
        tok = load_tokenizer(root / "tokenizer")
        t5 = load_t5_encoder(root / "text_encoder", param_dtype=param_dtype, dtype=dtype)
        return cls(t5, None, tok, t5_max_length=int(max_sequence_length), batch_size=batch_size,
                   t5_attention_mask=True, zero_pad=True, clean=wan_prompt_clean)

    def fingerprint(self) -> str:
        """sha256 over the encoders' configs and weight samples, the tokenizers and the lengths."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(f"t5_max_length={self.t5_max_length} clip_max_length={self.clip_max_length} "
                     f"t5_attention_mask={self.t5_attention_mask}\n".encode())
            if self.zero_pad or self.clean is not None:  # (absent before: older caches stay valid)
                h.update(f"zero_pad={self.zero_pad} clean={getattr(self.clean, '__qualname__', self.clean)}\n"
                         .encode())
            _module_fingerprint(h, "t5", self.t5)
            _tokenizer_fingerprint(h, "t5_tokenizer", self.t5_tokenizer)
            if self.clip is not None:
                _module_fingerprint(h, "clip", self.clip)
                _tokenizer_fingerprint(h, "clip_tokenizer", self.clip_tokenizer)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def encode(self, prompts: Sequence[str], *, return_mask: bool = False) -> tuple[np.ndarray, ...]:
        """``(t5_embeds (B, L, D), pooled (B, P) or None)`` as host arrays, plus the T5 tokens'
        attention mask (B, L) int32 when ``return_mask``."""
        prompts = _check_prompts(prompts, "PromptEncoder.encode")
        if self.clean is not None:
            prompts = [self.clean(p) for p in prompts]
        n, bs = len(prompts), self.batch_size
        t5_ids, t5_mask = tokenize(self.t5_tokenizer, prompts, self.t5_max_length)
        clip_ids = (tokenize(self.clip_tokenizer, prompts, self.clip_max_length)[0]
                    if self.clip is not None else None)
        embeds = pooled = None
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            e, p = self._run(self._t5_state, self._clip_state, *(
                None if a is None else np.pad(a[start:stop], ((0, bs - (stop - start)), (0, 0)), mode="edge")
                for a in (t5_ids, t5_mask, clip_ids)))
            e = np.asarray(e)[: stop - start]
            if embeds is None:  # preallocate: the full set can be gigabytes (T5-XXL: 4 MB per prompt)
                embeds = np.empty((n, *e.shape[1:]), e.dtype)
                if p is not None:
                    pooled = np.empty((n, *np.shape(p)[1:]), np.asarray(p).dtype)
            embeds[start:stop] = e
            if p is not None:
                pooled[start:stop] = np.asarray(p)[: stop - start]
        return (embeds, pooled, t5_mask) if return_mask else (embeds, pooled)

    __call__ = encode


@dataclasses.dataclass
class PromptEmbeddings:
    """Cached embeddings, one row per prompt in list order (arrays may be memory-mapped)."""

    prompts: list[str]
    t5: np.ndarray
    pooled: np.ndarray | None
    t5_attention_mask: np.ndarray
    encoder_hash: str

    def __len__(self) -> int:
        return len(self.prompts)

    def index(self, prompt: str) -> int:
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise DataError(f"prompt not in the cache: {prompt[:80]!r}") from None

    def take(self, rows: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """``(t5[rows], pooled[rows])`` for integer row indices."""
        rows = np.asarray(rows)
        return np.asarray(self.t5[rows]), None if self.pooled is None else np.asarray(self.pooled[rows])


def cache_path_for(prompt_file: str | os.PathLike, tag: str) -> Path:
    """Where the cache of a prompt file lives: next to it, ``<stem>.<tag>.embeds.safetensors``
    (``tag`` names the encoder setup, e.g. ``"flux-dev"``)."""
    p = Path(prompt_file)
    return p.with_name(f"{p.stem}.{tag}.embeds.safetensors")


def build_cache(prompts: Sequence[str], encoder: PromptEncoder, path: str | os.PathLike, *,
                overwrite: bool = False) -> PromptEmbeddings:
    """Encode ``prompts`` once and store them at ``path``. An existing cache for the same prompts
    and encoder is reused unless ``overwrite``; a stale one is rebuilt."""
    prompts = _check_prompts(prompts, "build_cache")
    path = Path(path)
    fingerprint = encoder.fingerprint()
    if path.exists() and not overwrite:
        try:
            return load_cache(path, prompts, encoder_hash=fingerprint)
        except DataError as e:
            log.info("rebuilding prompt cache %s: %s", path, e)
    embeds, pooled, mask = encoder.encode(prompts, return_mask=True)
    tensors = {"t5": embeds, "t5_attention_mask": mask.astype(np.int32)}
    if pooled is not None:
        tensors["pooled"] = pooled
    metadata = {
        "format": CACHE_FORMAT,
        "prompts_sha256": prompts_hash(prompts),
        "encoder_sha256": fingerprint,
        "num_prompts": str(len(prompts)),
        "t5_max_length": str(encoder.t5_max_length),
        "clip_max_length": str(encoder.clip_max_length) if encoder.clip is not None else "",
        "t5_attention_mask": str(encoder.t5_attention_mask),
        "prompts": json.dumps(prompts, ensure_ascii=False),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(path, tensors, metadata)
    return PromptEmbeddings(prompts, embeds, pooled, mask, fingerprint)


def _describe_difference(stored: list[str] | None, prompts: list[str]) -> str:
    if stored is None:
        return ""
    if len(stored) != len(prompts):
        return f" (it holds {len(stored)} prompts, {len(prompts)} were asked for)"
    for i, (a, b) in enumerate(zip(stored, prompts)):
        if a != b:
            return f" (first difference at prompt {i}: cached {a[:60]!r}, asked {b[:60]!r})"
    return ""


def load_cache(path: str | os.PathLike, prompts: Sequence[str], *, encoder: PromptEncoder | None = None,
               encoder_hash: str | None = None) -> PromptEmbeddings:
    """Open the cache at ``path`` (memory-mapped) and check it was built for exactly ``prompts``
    (and, when ``encoder`` or ``encoder_hash`` is given, by that encoder)."""
    prompts = _check_prompts(prompts, "load_cache")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompt-embedding cache at {path}; create it with build_cache(prompts, encoder, path)")
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        raise DataError(f"unreadable prompt-embedding cache {path}: {e}. Delete it and rebuild.") from e
    meta = f.metadata
    if meta.get("format") != CACHE_FORMAT or "t5" not in f or "t5_attention_mask" not in f:
        raise DataError(f"{path} is not a vipo_jax prompt-embedding cache (format {meta.get('format')!r})")
    try:
        stored = json.loads(meta["prompts"])
    except (KeyError, json.JSONDecodeError):
        stored = None
    if meta.get("prompts_sha256") != prompts_hash(prompts):
        raise DataError(f"stale prompt-embedding cache {path}: it was built for a different prompt list"
                        f"{_describe_difference(stored, prompts)}. Rebuild it with build_cache.")
    if encoder is not None:
        encoder_hash = encoder.fingerprint()
    if encoder_hash is not None and meta.get("encoder_sha256") != encoder_hash:
        raise DataError(f"stale prompt-embedding cache {path}: it was built with different text encoders, "
                        "tokenizers or sequence lengths. Rebuild it with build_cache.")
    t5, mask = f["t5"], f["t5_attention_mask"]
    pooled = f["pooled"] if "pooled" in f else None
    rows = {len(prompts), t5.shape[0], mask.shape[0]} | ({pooled.shape[0]} if pooled is not None else set())
    if len(rows) != 1:
        raise DataError(f"corrupt prompt-embedding cache {path}: row counts {sorted(rows)} disagree")
    return PromptEmbeddings(prompts, t5, pooled, mask, meta.get("encoder_sha256", ""))
