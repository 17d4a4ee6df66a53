"""ImageReward (BLIP ViT + BERT with cross-attention + linear head): parity, the .pt -> safetensors
converter, on-device preprocessing, the scorer, strict loading errors.

Reference. The real package (PyPI ``image-reward`` 1.5) cannot be the CI reference: installed
normally from requirements-test.txt it pins ``timm==0.6.13`` and ``fairscale==0.4.13`` (pip then
downgrades open_clip to 2.x for everyone and builds fairscale from source), and a requirements file
cannot say ``--no-deps``; even installed that way, its ``med.py`` imports helpers that transformers
5 (which we require) moved or removed, and its ``BertModel.forward`` calls ``get_head_mask`` /
``invert_attention_mask``, which transformers 5 dropped. So the CI reference is transformers'
``BlipVisionModel`` + ``BlipTextModel`` (``is_decoder=True`` gives every layer BLIP's
cross-attention; called with ``is_decoder=False`` it is med.py's ``mode="multimodal"``): the same
architecture, whose weights the fixture writes in the real ``ImageReward.pt`` key layout
(``blip.visual_encoder.*`` with timm names and a fused ``qkv``, ``blip.text_encoder.*`` med.py
names, ``mlp.layers.{0,2,4,6,7}``, plus the ``blip.vision_proj`` / ``blip.text_proj`` /
``position_ids`` entries the release also holds). The reference score is ``ImageReward.score_gard``
written with those modules. Where the real package is importable (``pip install --no-deps
image-reward==1.5``), ``test_real_package_parity`` also compares with its own classes and
``score_gard``, with a few transformers-5 shims (see ``_import_real_image_reward``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.convert import main as convert_main
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.models.blip import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    BlipTextConfig,
    BlipVisionConfig,
    ImageRewardConfig,
    ImageRewardModel,
    convert_image_reward_checkpoint,
)
from vipo_jax.models.blip import from_pretrained as load_image_reward
from vipo_jax.models.blip.convert import head_source_indices
from vipo_jax.rewards.image_reward import (
    BLIP_MEAN,
    BLIP_STD,
    ImageRewardScorer,
    image_reward_score,
    load_blip_tokenizer,
    make_score_fn,
    preprocess,
)
from vipo_jax.weights.loading import abstract_params
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors

REPO = Path(__file__).resolve().parent.parent
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "##s", "sky", "green", "house"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
VOCAB_SIZE = len(VOCAB) + 2  # + BLIP's [DEC], [ENC]
MAX_LENGTH = 35  # the release's
VISION = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
TEXT = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=40, layer_norm_eps=1e-12, hidden_act="gelu")
HEAD = (1024, 128, 64, 16)  # the release's widths (cheap)
OUR_CFG = {"model_type": "image_reward", "vision_config": VISION,
           "text_config": {**TEXT, "encoder_width": 32, "add_cross_attention": True},
           "mlp_hidden_sizes": list(HEAD), "max_length": MAX_LENGTH}
PROMPTS = ["a photo of a red cat", "the dogs", "a green house on the blue sky of a photo of a cat"]
ERRORS: dict[str, float] = {}


# --- jitted forwards (graphdef static: one compile per shape) ----------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _image_embeds(graphdef, state, pixels):
    return nnx.merge(graphdef, state).image_embeds(pixels)


@functools.partial(jax.jit, static_argnums=0)
def _text(graphdef, state, ids, mask, image_embeds):
    m = nnx.merge(graphdef, state)
    return m.text_encoder(ids, mask, image_embeds), m.text_features(ids, mask, image_embeds)


def _run(fn, model, *args):
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, fn(graphdef, state, *(jnp.asarray(a) for a in args)))


# --- reference ---------------------------------------------------------------------------------------
def _transformers():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


def _perturb(torch, module, seed):
    # Reference inits leave norms at 1 / 0, biases at 0 and the ViT at ~1e-10: randomise everything so
    # a mixed-up or transposed parameter is caught.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _reference_head(torch, width):
    """ImageReward's ``MLP``: Linear layers with dropouts between the first four, no activations."""
    nn = torch.nn
    sizes = (width, *HEAD, 1)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < 3:
            layers.append(nn.Dropout(0.2 if i < 2 else 0.1))
    head = nn.Module()
    head.layers = nn.Sequential(*layers)
    return head


_VISION_RENAMES = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                   ("embeddings.patch_embedding.", "patch_embed.proj."), ("encoder.layers.", "blocks."),
                   (".self_attn.qkv.", ".attn.qkv."), (".self_attn.projection.", ".attn.proj."),
                   (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), ("post_layernorm.", "norm.")]


def _vision_key(k: str) -> str:
    for a, b in _VISION_RENAMES:
        k = k.replace(a, b)
    return k


def _image_reward_state_dict(torch, vision, text, head):
    """The reference modules' weights under ``ImageReward.pt``'s key names."""
    sd = {f"blip.visual_encoder.{_vision_key(k)}": v for k, v in vision.state_dict().items()}
    sd.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    sd.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    # Also in the release: the BERT position_ids buffer and BLIP_Pretrain's unused contrastive heads.
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    g = torch.Generator().manual_seed(9)
    for name, width in (("vision_proj", VISION["hidden_size"]), ("text_proj", TEXT["hidden_size"])):
        sd[f"blip.{name}.weight"] = torch.randn(16, width, generator=g)
        sd[f"blip.{name}.bias"] = torch.randn(16, generator=g)
    return sd


class _Reference:
    """``ImageReward.score_gard`` with transformers' BLIP modules."""

    def __init__(self, torch, vision, text, head):
        self.torch, self.vision, self.text, self.head = torch, vision, text, head

    def image_embeds(self, pixels_nchw):
        return self.vision(pixel_values=pixels_nchw).last_hidden_state

    def text_hidden(self, ids, mask, image_embeds):
        atts = self.torch.ones(image_embeds.shape[:-1], dtype=self.torch.long)
        return self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=atts, return_dict=True).last_hidden_state

    def score(self, pixels_nchw, ids, mask):
        feats = self.text_hidden(ids, mask, self.image_embeds(pixels_nchw))[:, 0, :].float()
        return ((self.head.layers(feats) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD)[:, 0]


def _torch_preprocess(torch, images01, size):
    """ImageReward's ``_transform(size)`` on tensors: Resize(size, BICUBIC) (antialiased), CenterCrop,
    Normalize with the constants written in ImageReward.py. The reference transforms PIL images, whose
    uint8 pixels clip the bicubic overshoot to [0, 1]: the clamp stands for that (the uint8 rounding
    itself is left out, see vipo_jax/rewards/clip_scores.py)."""
    import torchvision.transforms as T

    x = torch.from_numpy(np.asarray(images01, np.float32)).permute(0, 3, 1, 2)
    x = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(x).clamp(0, 1)
    x = T.CenterCrop(size)(x)
    return T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(x)


# --- fixtures ------------------------------------------------------------------------------------------
def write_tokenizer(folder: Path) -> Path:
    """The tiny bert-base-uncased-style vocabulary BLIP's tokenizer is built from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


def write_reference(torch, root: Path) -> _Reference:
    """Random tiny reference modules, saved as ``root/ImageReward.pt`` (the release's key layout)
    and converted by our converter into ``root/converted`` (with the tokenizer in its
    ``tokenizer/``, where ``ImageRewardScorer.from_folder`` looks by default)."""
    tf = _transformers()
    torch.manual_seed(0)
    vision = tf.BlipVisionModel(tf.BlipVisionConfig(**VISION)).eval()
    # BLIP's token ids, in the tiny vocabulary ([DEC] is the bos token, [SEP] ends a prompt).
    special = dict(bos_token_id=VOCAB_SIZE - 2, sep_token_id=VOCAB.index("[SEP]"), eos_token_id=VOCAB.index("[SEP]"))
    text = tf.BlipTextModel(tf.BlipTextConfig(**TEXT, **special, encoder_hidden_size=VISION["hidden_size"],
                                              is_decoder=True), add_pooling_layer=False).eval()
    head = _reference_head(torch, TEXT["hidden_size"]).eval()
    for i, m in enumerate((vision, text, head)):
        _perturb(torch, m, i + 1)
    pt = root / "ImageReward.pt"
    torch.save(_image_reward_state_dict(torch, vision, text, head), pt)  # a plain state dict, like the release
    (root / "cfg.json").write_text(json.dumps(OUR_CFG))
    convert_image_reward_checkpoint(pt, root / "converted", config=OUR_CFG)
    write_tokenizer(root / "converted" / "tokenizer")
    return _Reference(torch, vision, text, head)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("bert_tok"))


@pytest.fixture(scope="module")
def tokens(tok_dir):
    tok = load_blip_tokenizer(tok_dir)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and lengths.max() < MAX_LENGTH  # padded, distinct lengths
    return ids, mask


@pytest.fixture(scope="module")
def ref(torch, tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    return write_reference(torch, root), root


@pytest.fixture(scope="module")
def ours(ref):
    return load_image_reward(ref[1] / "converted")


@pytest.fixture(scope="module")
def images01():
    return np.random.default_rng(0).uniform(size=(3, 48, 40, 3)).astype(np.float32)  # portrait: resize + crop


@pytest.fixture(scope="module")
def ref_outputs(torch, ref, images01, tokens):
    r = ref[0]
    ids, mask = (torch.from_numpy(a) for a in tokens)
    with torch.no_grad():
        pixels = _torch_preprocess(torch, images01, VISION["image_size"])
        img = r.image_embeds(pixels)
        hidden = r.text_hidden(ids, mask, img)
        score = r.score(pixels, ids, mask)
    return dict(pixels=pixels.permute(0, 2, 3, 1).numpy(), image_embeds=img.numpy(), hidden=hidden.numpy(),
                score=score.numpy())


# --- parity ----------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_image_embeds_parity(ours, ref_outputs):
    got = _run(_image_embeds, ours, ref_outputs["pixels"])
    ERRORS["image embeds"] = assert_close(got, ref_outputs["image_embeds"], what="visual_encoder output")


@pytest.mark.torch
def test_text_features_parity_padded(ours, ref_outputs, tokens):
    hidden, feats = _run(_text, ours, *tokens, ref_outputs["image_embeds"])
    ref_hidden = ref_outputs["hidden"]
    ERRORS["text features [:, 0]"] = assert_close(feats, ref_hidden[:, 0], what="text features (first token)")
    # Every position, padded ones included (they attend to the unpadded keys only).
    ERRORS["text hidden (all positions)"] = assert_close(hidden, ref_hidden, what="text_encoder last_hidden_state")


@pytest.mark.torch
def test_score_parity_end_to_end(ref, ref_outputs, images01, tok_dir):
    """[0, 1] images + prompt strings -> scores, through our tokenizer, preprocessing and jitted model."""
    scorer = ImageRewardScorer.from_folder(ref[1] / "converted", tokenizer=tok_dir)
    got = scorer.score(images01, PROMPTS)
    assert got.shape == (3,)
    ERRORS["score"] = assert_close(got, ref_outputs["score"], what="ImageReward score")
    # The pure function, jitted by the caller, on the scorer's parameters.
    ids, mask = scorer.tokenize(PROMPTS)
    fn = jax.jit(make_score_fn(scorer.graphdef))
    assert_close(fn(scorer.params, jnp.asarray(images01), ids, mask), ref_outputs["score"], what="make_score_fn")
    # One prompt for every image.
    one = scorer.score(images01, PROMPTS[1])
    assert_close(one[1], ref_outputs["score"][1], what="broadcast prompt")


@pytest.mark.torch
def test_score_is_differentiable(ours, images01, tokens):
    """The reward can be back-propagated to the pixels (ReFL-style use), and the gradient is finite."""
    ids, mask = (jnp.asarray(a) for a in tokens)
    graphdef, state = nnx.split(ours)
    fn = make_score_fn(graphdef)
    g = jax.jit(jax.grad(lambda x: jnp.sum(fn(state, x, ids, mask))))(jnp.asarray(images01) * 0.9 + 0.05)
    assert g.shape == images01.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


# --- preprocessing ---------------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("shape,size", [((2, 48, 40, 3), 32), ((1, 256, 320, 3), 224), ((1, 224, 224, 3), 224)])
def test_preprocess_matches_torchvision(torch, shape, size):
    images = np.random.default_rng(1).uniform(size=shape).astype(np.float32)
    ours_px = np.asarray(preprocess(jnp.asarray(images), size))
    ref_px = _torch_preprocess(torch, images, size).permute(0, 2, 3, 1).numpy()
    err = assert_close(ours_px, ref_px, rel=1e-5 / max(1.0, float(np.abs(ref_px).max())), what="preprocess")
    ERRORS[f"preprocess {shape[1]}x{shape[2]}->{size}"] = err
    assert BLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and BLIP_STD == (0.26862954, 0.26130258, 0.27577711)


# --- converter -------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_convert_cli_subprocess(ref, tmp_path):
    root = ref[1]
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "vipo_jax.convert", "image-reward", str(root / "ImageReward.pt"),
                           str(out), "--config", str(root / "cfg.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    keys = set(open_checkpoint(out / "model.safetensors").keys())
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in keys and "mlp.layers.7.bias" in keys
    assert "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight" in keys
    assert not any("vision_proj" in k or "text_proj" in k or "position_ids" in k for k in keys)
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "image_reward" and written["reward_mean"] == IMAGE_REWARD_MEAN
    assert written["text_config"]["encoder_width"] == VISION["hidden_size"]
    assert ImageRewardConfig.from_pretrained(out) == ImageRewardConfig.from_pretrained(root / "converted")


@pytest.mark.torch
def test_convert_med_config(ref, tmp_path):
    """``--med-config`` reads BLIP's med_config.json (BERT names, extra keys ignored) for the text tower."""
    root = ref[1]
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "model_type": "bert",
           "type_vocab_size": 2, "initializer_range": 0.02, "hidden_dropout_prob": 0.1, "encoder_width": 768,
           "add_cross_attention": True, "pad_token_id": 0, **TEXT}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    cfg = {k: v for k, v in OUR_CFG.items() if k != "text_config"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert convert_main(["image-reward", str(root / "ImageReward.pt"), str(tmp_path / "o"), "--config",
                         str(tmp_path / "cfg.json"), "--med-config", str(tmp_path / "med_config.json")]) == 0
    loaded = ImageRewardConfig.from_pretrained(tmp_path / "o")
    assert loaded.text_config.encoder_width == VISION["hidden_size"]  # BLIP_Pretrain's override
    assert loaded == ImageRewardConfig.from_pretrained(root / "converted")


# --- errors ----------------------------------------------------------------------------------------------
def _copy_with(src_folder: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src_folder / "config.json", dst / "config.json")
    tensors = {k: np.array(v) for k, v in open_checkpoint(src_folder / "model.safetensors").items()}
    edit(tensors)
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


@pytest.mark.torch
def test_missing_key(ref, tmp_path):
    key = "blip.text_encoder.encoder.layer.1.crossattention.output.dense.bias"
    folder = _copy_with(ref[1] / "converted", tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        load_image_reward(folder)
    folder = _copy_with(ref[1] / "converted", tmp_path / "h", lambda t: t.pop("mlp.layers.6.weight"))
    with pytest.raises(CheckpointError, match="missing key 'mlp.layers.6.weight'"):
        load_image_reward(folder)


@pytest.mark.torch
def test_wrong_shape(ref, tmp_path):
    def bad_qkv(t):
        t["blip.visual_encoder.blocks.0.attn.qkv.weight"] = np.zeros((64, 32), np.float32)

    folder = _copy_with(ref[1] / "converted", tmp_path / "q", bad_qkv)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks.0.attn.qkv.weight"):
        load_image_reward(folder)

    def bad_vocab(t):
        t["blip.text_encoder.embeddings.word_embeddings.weight"] = np.zeros((VOCAB_SIZE + 1, 32), np.float32)

    folder = _copy_with(ref[1] / "converted", tmp_path / "v", bad_vocab)
    with pytest.raises(CheckpointError, match=r"shape mismatch for text_encoder.word_embeddings.embedding.*"
                                              rf"\({VOCAB_SIZE + 1}, 32\)"):
        load_image_reward(folder)

    def bad_pos(t):
        t["blip.visual_encoder.pos_embed"] = np.zeros((2, 5, 32), np.float32)

    folder = _copy_with(ref[1] / "converted", tmp_path / "p", bad_pos)
    with pytest.raises(CheckpointError, match="shape mismatch for blip.visual_encoder.pos_embed"):
        load_image_reward(folder)


@pytest.mark.torch
def test_unexpected_key_and_wrong_depth(ref, tmp_path):
    def add(t):
        t["blip.visual_encoder.blocks.2.norm1.weight"] = t["blip.visual_encoder.blocks.1.norm1.weight"]

    folder = _copy_with(ref[1] / "converted", tmp_path / "u", add)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks.2.norm1.weight"):
        load_image_reward(folder)
    deeper = {**OUR_CFG, "text_config": {**OUR_CFG["text_config"], "num_hidden_layers": 3}}
    with pytest.raises(CheckpointError, match="missing key 'blip.text_encoder.encoder.layer.2"):
        convert_image_reward_checkpoint(ref[1] / "ImageReward.pt", tmp_path / "x", config=deeper)
    assert not (tmp_path / "x").exists()


@pytest.mark.torch
def test_rejects_non_image_reward(torch, ref, tmp_path, capsys):
    # A CLIP (open_clip / HPS-style) state dict.
    clip_pt = tmp_path / "hps.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "logit_scale": torch.zeros(())}},
               clip_pt)
    with pytest.raises(CheckpointError, match="not an ImageReward checkpoint.*CLIP"):
        convert_image_reward_checkpoint(clip_pt, tmp_path / "o1", config=OUR_CFG)
    # BLIP's own pretraining checkpoint: no "blip." prefix, no reward head.
    blip_pt = tmp_path / "model_large.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 32)}}, blip_pt)
    with pytest.raises(CheckpointError, match="not an ImageReward checkpoint.*BLIP checkpoint"):
        convert_image_reward_checkpoint(blip_pt, tmp_path / "o2", config=OUR_CFG)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a pickle\n")
    assert convert_main(["image-reward", str(junk), str(tmp_path / "o3")]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    # A folder of another model (a CLIP config.json) is refused by the loader.
    other = tmp_path / "clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip"}))
    shutil.copy(ref[1] / "converted" / "model.safetensors", other / "model.safetensors")
    with pytest.raises(CheckpointError, match="model_type 'clip', not 'image_reward'"):
        load_image_reward(other)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_image_reward(tmp_path)


@pytest.mark.torch
def test_scorer_tokenizer_checks(ours, ref, tmp_path, images01):
    bigger = tmp_path / "tok"
    bigger.mkdir()
    (bigger / "vocab.txt").write_text("\n".join([*VOCAB, "extra"]) + "\n")
    with pytest.raises(CheckpointError, match=f"tokenizer has {VOCAB_SIZE + 1} tokens but the text encoder's "
                                              f"vocabulary is {VOCAB_SIZE}"):
        ImageRewardScorer(ours, bigger)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ref[1] / "converted" / f, bare / f)
    with pytest.raises(DataError, match="no tokenizer"):
        ImageRewardScorer.from_folder(bare)
    with pytest.raises(DataError, match="has no tokenizer"):
        ImageRewardScorer(ours).score(images01, PROMPTS)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        image_reward_score(ours, jnp.asarray(images01), jnp.ones((2, 8), jnp.int32))


@pytest.mark.torch
def test_bfloat16_compute(ref, ref_outputs, tok_dir, images01):
    """bf16 compute (float32 norms, softmax and head) stays close to the float32 reference."""
    scorer = ImageRewardScorer.from_folder(ref[1] / "converted", tokenizer=tok_dir, dtype="bfloat16")
    assert scorer.cfg.text_config.dtype == scorer.cfg.vision_config.dtype == "bfloat16"
    ERRORS["score, bf16 compute"] = assert_close(scorer.score(images01, PROMPTS), ref_outputs["score"], rel=3e-2,
                                                 what="bf16 score")


# --- configs ---------------------------------------------------------------------------------------------
def test_release_config():
    cfg = ImageRewardConfig()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == \
        (1024, 24, 16, 16, 224)
    assert (v.intermediate_size, v.layer_norm_eps, v.num_patches) == (4096, 1e-6, 196)
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == \
        (30524, 768, 12, 12, 3072)
    assert (t.encoder_width, t.layer_norm_eps, t.add_cross_attention) == (1024, 1e-12, True)
    assert (cfg.reward_mean, cfg.reward_std, cfg.max_length) == (0.16717362830052426, 1.0333394966054072, 35)
    assert head_source_indices(cfg) == [0, 2, 4, 6, 7]
    # The full-size model's parameters (shapes only): ViT-L/16 at 224 + bert-base with cross-attention.
    shapes = {k: v.shape for k, v in abstract_params(nnx.eval_shape(lambda: ImageRewardModel(cfg, rngs=nnx.Rngs(0))))
              .items()}
    assert shapes["visual_encoder.pos_embed"] == (197, 1024)
    assert shapes["visual_encoder.blocks.attn.q.kernel"] == (24, 1024, 1024)
    assert shapes["text_encoder.layers.crossattention.key.kernel"] == (12, 1024, 768)
    assert shapes["text_encoder.word_embeddings.embedding"] == (30524, 768)
    assert shapes["head.0.kernel"] == (768, 1024) and shapes["head.4.kernel"] == (16, 1)
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == 446_206_689, n  # ViT-L 303.3M + text encoder 142.0M + head 0.9M
    assert ImageRewardConfig.from_dict(cfg.to_dict()) == cfg
    rt = ImageRewardConfig.from_dict(cfg.to_dict(), dtype="bfloat16", remat="full")
    assert rt.vision_config.dtype == rt.text_config.dtype == "bfloat16" and rt.text_config.remat == "full"
    assert BlipTextConfig.from_dict({"encoder_hidden_size": 512}).encoder_width == 512  # transformers' name
    with pytest.raises(ConfigError, match=r"unknown.*not_a_field"):
        ImageRewardConfig.from_dict(cfg.to_dict(), not_a_field=1)
    with pytest.raises(ConfigError, match="not a multiple"):
        BlipVisionConfig(image_size=225)
    with pytest.raises(ConfigError, match="position_embedding_type"):
        BlipTextConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="max_length 600"):
        ImageRewardConfig(max_length=600)


# --- the real package, where installed ---------------------------------------------------------------------
def _import_real_image_reward():
    """Import image-reward 1.5's model modules without its package ``__init__`` (which imports the
    OpenAI ``clip`` package, datasets and diffusers for its baselines and ReFL trainer). Stubs and
    shims, none of which changes what the model computes: fairscale's ``checkpoint_wrapper`` (only
    used with gradient checkpointing, off here); the transformers-4 names med.py imports
    (``apply_chunking_to_forward`` now lives in ``pytorch_utils``; ``find_pruneable_heads_and_indices``
    is only used to prune heads); and the two ``PreTrainedModel`` methods transformers 5 removed that
    ``BertModel.forward`` calls, with transformers 4's behaviour (no head mask; ``(1 - mask) *
    finfo.min``), and the (empty) tied-weight table transformers 5's ``init_weights`` expects."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None or spec.origin is None:
        return None
    import torch
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    root = Path(spec.origin).parent
    for name, path in (("ImageReward", root), ("ImageReward.models", root / "models"),
                       ("ImageReward.models.BLIP", root / "models" / "BLIP")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    if importlib.util.find_spec("fairscale") is None:
        names = ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations")
        for n in names:
            sys.modules.setdefault(n, types.ModuleType(n))

        def checkpoint_wrapper(*a, **k):
            raise AssertionError("gradient checkpointing is not used")

        sys.modules[names[-1]].checkpoint_wrapper = checkpoint_wrapper
    if not hasattr(mu, "apply_chunking_to_forward"):
        mu.apply_chunking_to_forward = pu.apply_chunking_to_forward
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(*a, **k):
            raise AssertionError("head pruning is not used")

        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
    if not hasattr(mu, "prune_linear_layer"):
        mu.prune_linear_layer = pu.prune_linear_layer
    ir = importlib.import_module("ImageReward.ImageReward")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    if not hasattr(med.BertModel, "all_tied_weights_keys"):
        # transformers 5's init_weights() reads the tied-weight table post_init() builds, which med.py
        # (calling init_weights() directly) never builds; BertModel ties nothing.
        med.BertModel.all_tied_weights_keys = {}
    if not hasattr(med.BertModel, "get_head_mask"):
        med.BertModel.get_head_mask = lambda self, head_mask, n: [None] * n if head_mask is None else head_mask
    if not hasattr(med.BertModel, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            ext = ext.to(dtype=self.dtype)
            return (1.0 - ext) * torch.finfo(self.dtype).min

        med.BertModel.invert_attention_mask = invert_attention_mask
    return types.SimpleNamespace(ImageReward=ir, med=med, vit=vit)


@pytest.fixture(scope="module")
def real(torch, tok_dir, tmp_path_factory):
    pkg = _import_real_image_reward()
    if pkg is None:
        pytest.skip("image-reward is not installed (pip install --no-deps image-reward==1.5); the transformers "
                    "BLIP reference above covers CI")
    bp = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("real_ir")
    med_cfg = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": TEXT["hidden_size"],
               "intermediate_size": TEXT["intermediate_size"], "layer_norm_eps": 1e-12, "num_attention_heads": 4,
               "num_hidden_layers": 2, "max_position_embeddings": TEXT["max_position_embeddings"],
               "vocab_size": VOCAB_SIZE, "pad_token_id": 0, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
               "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "model_type": "bert",
               "encoder_width": 768, "add_cross_attention": True}
    (root / "med_config.json").write_text(json.dumps(med_cfg))
    # ImageReward() hard-codes ViT-L at 224, bert-base-uncased from the hub and MLP(768): build the same
    # classes at the tiny size instead (the module's own names, so its own state_dict layout).
    size = VISION["image_size"]
    patches = dict(
        create_vit=lambda vit, image_size, *a, **k: (pkg.vit.VisionTransformer(
            img_size=size, patch_size=16, embed_dim=32, depth=2, num_heads=4), 32),
        init_tokenizer=lambda: load_blip_tokenizer(tok_dir))
    saved = {k: getattr(bp, k) for k in patches}
    saved_mlp = pkg.ImageReward.MLP
    try:
        for k, v in patches.items():
            setattr(bp, k, v)
        pkg.ImageReward.MLP = lambda n: saved_mlp(TEXT["hidden_size"])
        model = pkg.ImageReward.ImageReward(med_config=str(root / "med_config.json")).eval()
    finally:
        for k, v in saved.items():
            setattr(bp, k, v)
        pkg.ImageReward.MLP = saved_mlp
    _perturb(torch, model, 7)
    torch.save(model.state_dict(), root / "ImageReward.pt")
    convert_image_reward_checkpoint(root / "ImageReward.pt", root / "converted", config=OUR_CFG,
                                    med_config=root / "med_config.json")
    return model, root, pkg


@pytest.mark.torch
def test_real_package_parity(torch, real, tok_dir, images01):
    model, root, pkg = real
    keys = set(model.state_dict())
    assert {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.blocks.0.attn.qkv.weight",
            "blip.text_encoder.encoder.layer.1.crossattention.self.value.weight", "blip.vision_proj.weight",
            "blip.text_encoder.embeddings.position_ids", "mlp.layers.7.weight"} <= keys
    scorer = ImageRewardScorer.from_folder(root / "converted", tokenizer=tok_dir)
    ids, mask = scorer.tokenize(PROMPTS)
    with torch.no_grad():
        pixels = _torch_preprocess(torch, images01, VISION["image_size"])
        img = model.blip.visual_encoder(pixels)
        ref_hidden = model.blip.text_encoder(torch.from_numpy(ids.astype(np.int64)),
                                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                             encoder_hidden_states=img,
                                             encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long),
                                             return_dict=True).last_hidden_state
        ref_score = model.score_gard(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64)),
                                     pixels)[:, 0].numpy()
    ours = load_image_reward(root / "converted")
    ours_img = _run(_image_embeds, ours, pixels.permute(0, 2, 3, 1).numpy())
    ERRORS["real: image embeds"] = assert_close(ours_img, img.numpy(), what="real visual_encoder")
    hidden, _ = _run(_text, ours, ids, mask, img.numpy())
    ERRORS["real: text hidden"] = assert_close(hidden, ref_hidden.numpy(), what="real text_encoder (multimodal)")
    ERRORS["real: score"] = assert_close(scorer.score(images01, PROMPTS), ref_score, what="real score_gard")
    # ImageReward.score(prompt, PIL image): the release's own tokenizer call and PIL transforms (at the tiny
    # size). PIL resizes uint8 images with 8-bit results, so this agrees to the PIL rounding only.
    from PIL import Image

    model.preprocess = pkg.ImageReward._transform(VISION["image_size"])
    u8 = np.round(images01 * 255).astype(np.uint8)
    with torch.no_grad():
        pil_scores = np.array([model.score(p, Image.fromarray(im)) for p, im in zip(PROMPTS, u8)])
    ours_u8 = scorer.score(u8.astype(np.float32) / 255.0, PROMPTS)
    ERRORS["real: score via PIL (uint8 rounding)"] = assert_close(ours_u8, pil_scores, rel=1e-2, what="PIL score")
    # The release's tokenizer call (max_length 35, padding to it) gives our tokenize's ids.
    enc = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="np")
    np.testing.assert_array_equal(enc["input_ids"], ids)


def test_zz_report():
    """Prints the measured errors (run with -s)."""
    for k, v in ERRORS.items():
        print(f"max abs err {k}: {v:.2e}")
