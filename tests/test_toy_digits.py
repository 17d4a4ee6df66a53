"""The colored-digits toy world: rendering, captions, splits, tokenizers, toy rewards."""

from __future__ import annotations

import numpy as np
import pytest

from vipo_jax.errors import ConfigError
from vipo_jax.rewards import pixels as P
from vipo_jax.toy import digits as D
from vipo_jax.toy import rewards as R


@pytest.fixture(scope="module")
def train_sample():
    return D.sample_dataset(64, seed=0, split="train")


def test_render_shape_range_and_colors():
    img8, _ = D.load_split("train")
    rng = np.random.default_rng(0)
    out = D.render(img8[0], "red", "blue", rng=rng)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Background corners are exactly the bg color, stroke interiors the fg color, and there are
    # anti-aliased (intermediate) edge pixels too.
    np.testing.assert_allclose(out[0, 0], [0, 0, 1], atol=1e-3)
    red = np.all(np.abs(out - [1, 0, 0]) < 1e-2, axis=-1).mean()
    blue = np.all(np.abs(out - [0, 0, 1]) < 1e-2, axis=-1).mean()
    assert 0.05 < red < 0.5 and 0.4 < blue < 0.95
    assert red + blue < 0.999
    # No jitter without rng: deterministic; another size works; sklearn's 0..16 scale accepted.
    a = D.render(img8[1], 0, 8)
    np.testing.assert_array_equal(a, D.render(img8[1] * 16.0, "red", "black"))
    assert D.render(img8[1], "white", "gray", size=32).shape == (32, 32, 3)
    with pytest.raises(ConfigError, match="purple"):
        D.render(img8[0], "purple", "black")


def test_captions_and_labels(train_sample):
    images, captions, labels = train_sample
    assert images.shape == (64, 64, 64, 3) and images.dtype == np.float32
    assert labels.shape == (64, 3) and len(captions) == 64
    assert D.caption(3, "red", "blue") == "a red 3 on a blue background"
    assert D.caption(7, D.COLOR_NAMES.index("white"), "gray") == "a white 7 on a gray background"
    for cap, (d, f, b) in zip(captions, labels):
        assert cap == D.caption(d, f, b)
        assert f != b and f in D.FG_COLORS and b in D.BG_COLORS
    # Deterministic in the seed.
    again = D.sample_dataset(64, seed=0, split="train")
    np.testing.assert_array_equal(again.images, images)
    assert again.captions == captions
    assert D.sample_dataset(8, seed=1, split="train").captions != captions[:8]


def test_image_and_prompt_splits_are_disjoint():
    tr, ytr = D.load_split("train")
    ev, yev = D.load_split("eval")
    assert len(tr) + len(ev) == 1797 and len(ev) == round(0.2 * 1797)
    tr_set = {x.tobytes() for x in tr}
    assert not any(x.tobytes() in tr_set for x in ev)
    assert set(ytr) == set(yev) == set(range(10))

    p_all, p_tr, p_ev = D.prompt_set(), D.prompt_set("train"), D.prompt_set("eval")
    assert len(set(p_all)) == len(p_all) == 10 * sum(f != b for f in D.FG_COLORS for b in D.BG_COLORS)
    assert set(p_tr).isdisjoint(p_ev) and set(p_tr) | set(p_ev) == set(p_all)
    assert 0.1 < len(p_ev) / len(p_all) < 0.2
    assert D.prompt_set("train") == p_tr   # deterministic
    # Held-out prompts are compositional: every digit, color and (fg, bg) pair is seen in train.
    c_tr = D.prompt_combos("train")
    assert {d for d, _, _ in c_tr} == set(range(10))
    assert {(f, b) for _, f, b in c_tr} == {(f, b) for _, f, b in D.prompt_combos()}
    # Samples follow their split's prompts.
    ev_sample = D.sample_dataset(32, seed=0, split="eval")
    assert set(ev_sample.captions) <= set(p_ev)
    assert set(D.sample_dataset(32, seed=0, split="train").captions) <= set(p_tr)
    assert set(D.sample_dataset(32, seed=0, split="eval", prompt_split=None).captions) <= set(p_all)


def test_tokenizers_roundtrip_from_saved_folders(tmp_path):
    from transformers import AutoTokenizer

    from vipo_jax.toy.tokenizer import build_toy_tokenizers

    clip_dir, t5_dir = build_toy_tokenizers(tmp_path)
    assert clip_dir == tmp_path / "tokenizer" and t5_dir == tmp_path / "tokenizer_2"
    clip = AutoTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    t5 = AutoTokenizer.from_pretrained(str(t5_dir), local_files_only=True)
    assert clip.model_max_length == 10 and t5.model_max_length == 8
    assert t5.pad_token_id == 0 and t5.eos_token_id == 1 and t5.bos_token_id is None
    assert clip.pad_token_id == clip.eos_token_id == len(clip) - 1   # CLIP: pads with eos, eos last

    cap = "a red 3 on a blue background"
    e = clip(cap, padding="max_length", max_length=clip.model_max_length, truncation=True)
    toks = clip.convert_ids_to_tokens(e["input_ids"])
    assert toks[:9] == ["<|startoftext|>", "a", "red", "3", "on", "a", "blue", "background", "<|endoftext|>"]
    assert e["attention_mask"] == [1] * 9 + [0]
    e = t5(cap, padding="max_length", max_length=t5.model_max_length, truncation=True)
    assert t5.convert_ids_to_tokens(e["input_ids"]) == ["a", "red", "3", "on", "a", "blue", "background",
                                                        "</s>"]
    assert e["attention_mask"] == [1] * 8

    prompts = D.prompt_set()
    for tok, n_special in ((clip, 2), (t5, 1)):
        all_ids = tok(prompts)["input_ids"]
        for c, ids in zip(prompts, all_ids):
            assert len(ids) <= tok.model_max_length and len(ids) == len(c.split()) + n_special
            assert tok.unk_token_id not in ids, c
        assert tok.batch_decode(all_ids, skip_special_tokens=True) == prompts
    assert clip.unk_token_id in clip("a purple 3")["input_ids"]


def test_redness():
    pure = np.stack([np.broadcast_to(np.float32(c), (16, 16, 3)) for c in
                     ([1, 0, 0], [0, 0, 1], [0, 1, 0], [0.5, 0.5, 0.5])])
    np.testing.assert_allclose(np.asarray(P.redness(pure)), [1.0, -0.5, -0.5, 0.0], atol=1e-6)
    half = np.zeros((1, 4, 4, 3), np.float32)
    half[0, :2, :, 0] = 1.0      # top half red, bottom black
    np.testing.assert_allclose(np.asarray(P.redness(half)), [0.5], atol=1e-6)


def test_color_match(train_sample):
    images, _, labels = train_sample
    s = np.asarray(R.color_match(images, labels[:, 1], labels[:, 2]))
    assert s.shape == (64,) and s.mean() > 0.95
    fg, bg, _, _ = R.dominant_colors(images)
    assert (np.asarray(fg) == labels[:, 1]).mean() > 0.95
    assert (np.asarray(bg) == labels[:, 2]).mean() > 0.95
    # Swapped colors score 0, a wrong fg with the right bg 0.5.
    np.testing.assert_array_equal(np.asarray(R.color_match(images[:8], labels[:8, 2], labels[:8, 1])), 0.0)
    wrong_fg = np.where(labels[:8, 1] == 0, 1, 0)
    np.testing.assert_array_equal(np.asarray(R.color_match(images[:8], wrong_fg, labels[:8, 2])), 0.5)
    # A flat image: the background is its color.
    flat = np.broadcast_to(D.PALETTE_RGB[D.COLOR_NAMES.index("gray")], (1, 64, 64, 3))
    assert int(R.dominant_colors(flat)[1][0]) == D.COLOR_NAMES.index("gray")
