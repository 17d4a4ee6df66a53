"""Tiny word-level tokenizers for the toy world, laid out like FLUX's two tokenizers.

FLUX.1 ships `tokenizer/` (CLIP: bos `<|startoftext|>` + words + eos `<|endoftext|>`, padded with
`<|endoftext|>`, eos has the highest id) and `tokenizer_2/` (T5: words + eos `</s>`, pad `<pad>` id 0,
eos id 1, unk id 2, no bos). The toy versions keep those conventions over the toy vocabulary
(`vipo_jax.toy.digits.vocabulary()`), built with `tokenizers` (WordLevel model, Whitespace
pre-tokenizer) and saved with `transformers`' `save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(folder)` loads them offline.

Lengths: captions are at most 7 words ("a red 3 on a blue background"), so the T5-style one needs
7 + eos = 8 tokens (`model_max_length` 8) and the CLIP-style one bos + 7 + eos = 9 (`model_max_length`
10, one spare).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from vipo_jax.toy.digits import vocabulary

CLIP_BOS, CLIP_EOS, CLIP_UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
CLIP_MAX_LENGTH = 10
T5_MAX_LENGTH = 8


def clip_vocab() -> dict[str, int]:
    """Words first, then unk, bos and eos (eos last, the highest id, as in CLIP)."""
    toks = [*vocabulary(), CLIP_UNK, CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(toks)}


def t5_vocab() -> dict[str, int]:
    """pad 0, eos 1, unk 2 (as in T5), then the words."""
    toks = [T5_PAD, T5_EOS, T5_UNK, *vocabulary()]
    return {t: i for i, t in enumerate(toks)}


def make_clip_tokenizer():
    """CLIP-style `PreTrainedTokenizerFast`: lowercases, `<|startoftext|> words <|endoftext|>`,
    pads with `<|endoftext|>` (FLUX's CLIP tokenizer pads with eos too), max length 10."""
    from transformers import PreTrainedTokenizerFast

    vocab = clip_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=CLIP_UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}", pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=CLIP_BOS, eos_token=CLIP_EOS, pad_token=CLIP_EOS,
        unk_token=CLIP_UNK, model_max_length=CLIP_MAX_LENGTH, padding_side="right",
        truncation_side="right", model_input_names=["input_ids", "attention_mask"])


def make_t5_tokenizer():
    """T5-style `PreTrainedTokenizerFast`: `words </s>`, pad `<pad>` id 0, no bos, max length 8."""
    from transformers import PreTrainedTokenizerFast

    vocab = t5_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=T5_UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}",
        special_tokens=[(T5_EOS, vocab[T5_EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=T5_EOS, pad_token=T5_PAD, unk_token=T5_UNK,
        model_max_length=T5_MAX_LENGTH, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"])


def build_toy_tokenizers(out_dir: str | Path) -> tuple[Path, Path]:
    """Write `out_dir/tokenizer/` (CLIP-style) and `out_dir/tokenizer_2/` (T5-style) with
    `save_pretrained`; returns the two folders."""
    out = Path(out_dir)
    clip_dir, t5_dir = out / "tokenizer", out / "tokenizer_2"
    make_clip_tokenizer().save_pretrained(str(clip_dir))
    make_t5_tokenizer().save_pretrained(str(t5_dir))
    for folder in (clip_dir, t5_dir):
        # transformers 5 writes its own class name "TokenizersBackend"; "PreTrainedTokenizerFast"
        # loads the same tokenizer in transformers 5 and is also understood by transformers 4.
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return clip_dir, t5_dir
