"""Tokenizers (tiny offline folders) and the prompt-embedding cache (tiny random encoders, no torch)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import DataError
from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.text.prompt_cache import (
    PromptEncoder,
    build_cache,
    cache_path_for,
    load_cache,
    prompts_hash,
)
from vipo_jax.text.tokenizers import load_flux_tokenizers, load_tokenizer, t5_max_length, tokenize
from vipo_jax.weights.safetensors_io import SafetensorsFile

WORDS = "a cat dog on the mat red blue big small sits runs under tree".split()
T5_LEN, CLIP_LEN = 12, 8
PROMPTS = ["a cat sits on the mat", "big red dog runs", "a small blue tree",
           "the dog sits under the big tree on a red mat and a cat runs", "zebra"]


def _make_tokenizer(folder, specials, template, pad, model_max_length):
    """A word-level fast tokenizer saved the way transformers saves real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, unk_token="<unk>",
                                   model_max_length=model_max_length)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def flux_root(tmp_path_factory):
    """A FLUX.1-like folder with ``tokenizer/`` (CLIP-like) and ``tokenizer_2/`` (T5-like)."""
    root = tmp_path_factory.mktemp("flux")
    # T5: </s> appended, <pad> = 0. CLIP: BOS/EOS around the text, padded with EOS (as in FLUX).
    _make_tokenizer(root / "tokenizer_2", ["<pad>", "</s>", "<unk>"], "$A </s>", "<pad>", 512)
    _make_tokenizer(root / "tokenizer", ["<unk>", "<|startoftext|>", "<|endoftext|>"],
                    "<|startoftext|> $A <|endoftext|>", "<|endoftext|>", 77)
    return root


class StandInCLIP(nnx.Module):
    """The CLIPTextModel interface: ``(input_ids, attention_mask=None) -> (hidden, pooled)``."""

    def __init__(self, vocab: int, dim: int, proj: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.proj = nnx.Linear(dim, proj, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        eos = jnp.argmax(input_ids, axis=-1)  # EOS has the highest id, as in CLIP
        return h, self.proj(h[jnp.arange(h.shape[0]), eos])


T5_CFG = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def models():
    return T5Encoder(T5_CFG, rngs=nnx.Rngs(0)), StandInCLIP(32, 16, 24, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def encoder(flux_root, models):
    clip_tok, t5_tok = load_flux_tokenizers(flux_root)
    t5, clip = models
    return PromptEncoder(t5, clip, t5_tok, clip_tok, t5_max_length=T5_LEN, clip_max_length=CLIP_LEN,
                         batch_size=2)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def direct(model, *args):
    graphdef, state = nnx.split(model)
    return _apply(graphdef, state, *args)


# --- tokenizers ----------------------------------------------------------------------------------

def test_tokenize_pads_and_truncates(flux_root):
    clip_tok, t5_tok = load_flux_tokenizers(flux_root)
    ids, mask = tokenize(t5_tok, ["a cat sits", "big red dog runs on the blue mat", "zebra"], 6)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 6)
    v = {w: i + 3 for i, w in enumerate(WORDS)}
    np.testing.assert_array_equal(ids[0], [v["a"], v["cat"], v["sits"], 1, 0, 0])  # </s> then <pad>
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0])
    # truncated to max_length with the end token kept, as transformers (and FluxPipeline) do
    np.testing.assert_array_equal(ids[1], [v["big"], v["red"], v["dog"], v["runs"], v["on"], 1])
    np.testing.assert_array_equal(ids[2], [2, 1, 0, 0, 0, 0])  # unknown word
    cids, cmask = tokenize(clip_tok, "a cat", 5)
    np.testing.assert_array_equal(cids, [[1, v["a"], v["cat"], 2, 2]])  # padded with <|endoftext|>
    np.testing.assert_array_equal(cmask, [[1, 1, 1, 1, 0]])
    assert t5_max_length("dev") == 512 and t5_max_length("schnell") == 256


def test_tokenizer_errors(tmp_path, flux_root):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(DataError, match="tokenizer folder not found"):
        load_flux_tokenizers(tmp_path)
    tok = load_tokenizer(flux_root / "tokenizer_2")
    with pytest.raises(DataError, match="empty prompt list"):
        tokenize(tok, [], 8)


# --- encoder and cache ---------------------------------------------------------------------------

def test_encode_matches_unbatched_models(encoder, flux_root, models):
    t5, clip = models
    embeds, pooled = encoder.encode(PROMPTS)  # 5 prompts in batches of 2 (last one padded)
    assert embeds.shape == (5, T5_LEN, 32) and pooled.shape == (5, 24)
    t5_ids, _ = tokenize(encoder.t5_tokenizer, PROMPTS, T5_LEN)
    clip_ids, _ = tokenize(encoder.clip_tokenizer, PROMPTS, CLIP_LEN)
    # FluxPipeline passes no attention mask to the T5
    assert_close(embeds, direct(t5, jnp.asarray(t5_ids), None), rel=1e-5, what="t5 embeds")
    assert_close(pooled, direct(clip, jnp.asarray(clip_ids))[1], rel=1e-5, what="pooled")


def test_build_and_load(encoder, tmp_path, monkeypatch):
    prompt_file = tmp_path / "prompts.txt"
    path = cache_path_for(prompt_file, "flux-dev")
    assert path == tmp_path / "prompts.flux-dev.embeds.safetensors"
    built = build_cache(PROMPTS, encoder, path)
    meta = SafetensorsFile(path).metadata
    assert meta["prompts_sha256"] == prompts_hash(PROMPTS)
    assert meta["encoder_sha256"] == encoder.fingerprint()
    assert json.loads(meta["prompts"]) == PROMPTS and meta["t5_max_length"] == str(T5_LEN)

    cache = load_cache(path, PROMPTS, encoder=encoder)
    assert len(cache) == 5 and cache.encoder_hash == encoder.fingerprint()
    np.testing.assert_array_equal(np.asarray(cache.t5), built.t5)
    np.testing.assert_array_equal(np.asarray(cache.pooled), built.pooled)
    assert cache.t5_attention_mask.shape == (5, T5_LEN)
    t5_rows, pooled_rows = cache.take([cache.index("a small blue tree"), 0])
    np.testing.assert_array_equal(t5_rows, built.t5[[2, 0]])
    np.testing.assert_array_equal(pooled_rows, built.pooled[[2, 0]])

    # an up-to-date cache is reused, not recomputed
    monkeypatch.setattr(encoder, "encode", lambda *a, **k: pytest.fail("recomputed a valid cache"))
    again = build_cache(PROMPTS, encoder, path)
    np.testing.assert_array_equal(np.asarray(again.t5), built.t5)


def test_stale_cache(encoder, tmp_path):
    path = tmp_path / "c.safetensors"
    build_cache(PROMPTS, encoder, path)
    with pytest.raises(DataError, match="stale.*first difference at prompt 1"):
        load_cache(path, [PROMPTS[0], "a dog", *PROMPTS[2:]])
    with pytest.raises(DataError, match="stale.*holds 5 prompts, 4 were asked"):
        load_cache(path, PROMPTS[:4])
    with pytest.raises(DataError, match="stale.*different text encoders"):
        load_cache(path, PROMPTS, encoder_hash="0" * 64)
    # a rebuild happens for a new prompt list
    build_cache(PROMPTS[:3], encoder, path)
    assert len(load_cache(path, PROMPTS[:3])) == 3


def test_fingerprint_tracks_weights(encoder, flux_root, models):
    t5, clip = models
    other = PromptEncoder(T5Encoder(T5_CFG, rngs=nnx.Rngs(7)), clip, encoder.t5_tokenizer,
                          encoder.clip_tokenizer, t5_max_length=T5_LEN, clip_max_length=CLIP_LEN)
    assert other.fingerprint() != encoder.fingerprint()
    longer = PromptEncoder(t5, clip, encoder.t5_tokenizer, encoder.clip_tokenizer,
                           t5_max_length=T5_LEN + 1, clip_max_length=CLIP_LEN)
    assert longer.fingerprint() != encoder.fingerprint()
    same = PromptEncoder(t5, clip, encoder.t5_tokenizer, encoder.clip_tokenizer, t5_max_length=T5_LEN,
                         clip_max_length=CLIP_LEN, batch_size=4)
    assert same.fingerprint() == encoder.fingerprint()


def test_cache_errors(encoder, tmp_path):
    with pytest.raises(DataError, match="empty"):
        build_cache([], encoder, tmp_path / "e.safetensors")
    with pytest.raises(DataError, match="empty"):
        encoder.encode([])
    with pytest.raises(DataError, match="not a string"):
        build_cache(["ok", 3], encoder, tmp_path / "e.safetensors")
    with pytest.raises(DataError, match="no prompt-embedding cache"):
        load_cache(tmp_path / "missing.safetensors", PROMPTS)
    (tmp_path / "junk.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="unreadable prompt-embedding cache"):
        load_cache(tmp_path / "junk.safetensors", PROMPTS)
    with pytest.raises(DataError, match="FLUX.1 folder not found"):
        PromptEncoder.from_flux(tmp_path / "no-flux")


def test_t5_only_with_mask(flux_root, models):
    """Without CLIP (Wan2.1's UMT5 alone), passing the T5 attention mask."""
    t5, _ = models
    tok = load_tokenizer(flux_root / "tokenizer_2")
    enc = PromptEncoder(t5, None, tok, t5_max_length=T5_LEN, batch_size=4, t5_attention_mask=True)
    embeds, pooled, mask = enc.encode(PROMPTS[:3], return_mask=True)
    assert pooled is None
    ids, ref_mask = tokenize(tok, PROMPTS[:3], T5_LEN)
    np.testing.assert_array_equal(mask, ref_mask)
    assert_close(embeds, direct(t5, jnp.asarray(ids), jnp.asarray(mask)), rel=1e-5, what="masked t5")
