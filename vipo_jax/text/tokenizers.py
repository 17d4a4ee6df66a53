"""Tokenizers for the text encoders, loaded from local folders with transformers.

The FLUX.1 layout has ``tokenizer/`` (CLIP, 77 tokens) and ``tokenizer_2/`` (T5; diffusers uses
``max_sequence_length`` 512 for dev and 256 for schnell). :func:`tokenize` pads and truncates
exactly like diffusers' ``FluxPipeline._get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds``:
``padding="max_length", truncation=True`` (special tokens such as T5's ``</s>`` are kept at the end
of a truncated prompt; a truncation is logged as a warning, once per tokenizer and length, with the
number of tokens dropped). Note that FluxPipeline passes no attention mask to either text encoder: the
T5 attends to its padding tokens and the CLIP pooled output is read at the end-of-text token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import DataError

CLIP_MAX_LENGTH = 77
FLUX_T5_MAX_LENGTH = {"dev": 512, "schnell": 256}

log = logging.getLogger(__name__)
_warned: set[tuple[str, int]] = set()


def t5_max_length(variant: str) -> int:
    """diffusers' default ``max_sequence_length`` for a FLUX.1 variant ("dev" or "schnell")."""
    try:
        return FLUX_T5_MAX_LENGTH[variant]
    except KeyError:
        raise DataError(f"unknown FLUX.1 variant {variant!r}; expected one of {sorted(FLUX_T5_MAX_LENGTH)}") \
            from None


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """``AutoTokenizer.from_pretrained(folder)`` from local files only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"tokenizer folder not found: {folder}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"cannot load a tokenizer from {folder}: {e}") from e


def load_flux_tokenizers(root: str | os.PathLike) -> tuple[Any, Any]:
    """``(clip_tokenizer, t5_tokenizer)`` from a FLUX.1 folder's ``tokenizer/`` and ``tokenizer_2/``."""
    root = Path(root)
    return load_tokenizer(root / "tokenizer"), load_tokenizer(root / "tokenizer_2")


def tokenize(tok: Any, prompts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, both int32 (B, max_length): padded to ``max_length`` and
    truncated to it, as diffusers' FluxPipeline does."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise DataError("tokenize: empty prompt list")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise DataError(f"tokenize: prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    if int(max_length) <= 0:
        raise DataError(f"tokenize: max_length must be positive, got {max_length}")
    _warn_if_truncated(tok, prompts, int(max_length))
    enc = tok(prompts, padding="max_length", max_length=int(max_length), truncation=True,
              return_overflowing_tokens=False, return_length=False, return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    mask = np.asarray(enc["attention_mask"], dtype=np.int32)
    if ids.shape != (len(prompts), int(max_length)):
        raise DataError(f"tokenize: tokenizer returned shape {ids.shape}, expected {(len(prompts), max_length)}")
    return ids, mask


def _warn_if_truncated(tok: Any, prompts: list[str], max_length: int) -> None:
    """Log once per tokenizer and length when prompts are longer than ``max_length`` tokens: the text
    encoder never sees their end, which a user would otherwise not learn."""
    key = (str(getattr(tok, "name_or_path", type(tok).__name__)), max_length)
    if key in _warned:
        return
    lengths = [len(ids) for ids in tok(prompts, truncation=False, padding=False, verbose=False)["input_ids"]]
    over = [(n, p) for n, p in zip(lengths, prompts) if n > max_length]
    if over:
        _warned.add(key)
        longest, example = max(over, key=lambda x: x[0])
        log.warning("%d of %d prompt(s) are longer than the text encoder's %d tokens (tokenizer %s) and were "
                    "truncated; up to %d tokens dropped, e.g. from %r. Shorten them (the T5 length is "
                    "--config.sampling.max_text_len; CLIP's 77 and the toy world's are fixed; said once)",
                    len(over), len(prompts), max_length, key[0] or "?", longest - max_length, example[:80])
