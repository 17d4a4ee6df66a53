"""T5 v1.1 / UMT5 encoder: parity with transformers T5EncoderModel / UMT5EncoderModel, strict loading."""

from __future__ import annotations

import functools
import json
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.t5 import T5Config, T5Encoder
from vipo_jax.models.t5 import from_pretrained as load_t5_encoder
from vipo_jax.models.t5.model import relative_position_buckets
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors

TINY = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu", dropout_rate=0.0)
B, L = 2, 20


def _transformers():
    # transformers imports torchvision, whose compiled ops do not match the pinned CPU torch; we never
    # call them (see tests.utils.import_open_clip).
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import transformers

    return transformers


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


def run(model, ids, mask=None):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def _randomize_norms(torch, model):
    # transformers initialises the norms to ones; make them random so a mixed-up norm is caught.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, TINY["vocab_size"], size=(B, L)).astype(np.int64)
    mask = np.ones((B, L), np.int64)
    mask[1, 13:] = 0
    ids[1, 13:] = 0
    return ids, mask


def _reference(torch, model, ids, mask):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(input_ids=torch.from_numpy(ids), **kw).last_hidden_state.float().numpy()


@pytest.fixture(scope="module")
def t5_folders(torch, tmp_path_factory):
    tf = _transformers()
    torch.manual_seed(0)
    model = tf.T5EncoderModel(tf.T5Config(**TINY)).eval()
    _randomize_norms(torch, model)
    root = tmp_path_factory.mktemp("t5")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return model, root


@pytest.fixture(scope="module")
def umt5_folder(torch, tmp_path_factory):
    tf = _transformers()
    torch.manual_seed(0)
    model = tf.UMT5EncoderModel(tf.UMT5Config(**TINY)).eval()
    _randomize_norms(torch, model)
    folder = tmp_path_factory.mktemp("umt5") / "umt5"
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.torch
def test_buckets_match_transformers(torch):
    tf = _transformers()
    bucket = tf.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for num_buckets, max_distance, length in [(32, 128, 512), (8, 16, 40), (32, 128, 77), (16, 40, 100)]:
        pos = torch.arange(length)
        ref = bucket(pos[None, :] - pos[:, None], bidirectional=True, num_buckets=num_buckets,
                     max_distance=max_distance).numpy()
        ours = relative_position_buckets(length, num_buckets, max_distance)
        np.testing.assert_array_equal(ours, ref, err_msg=f"{num_buckets=} {max_distance=} {length=}")


@pytest.mark.torch
@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_t5_parity(torch, t5_folders, inputs, layout, masked):
    model, root = t5_folders
    if layout == "sharded":
        index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 2
    ours = load_t5_encoder(root / layout)
    assert not ours.cfg.per_layer_bias
    ids, mask = inputs
    mask = mask if masked else None
    err = assert_close(run(ours, ids, mask), _reference(torch, model, ids, mask), what=f"t5 {layout}")
    print(f"t5 {layout} mask={masked}: max abs err {err:.2e}")


@pytest.mark.torch
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_umt5_parity(torch, umt5_folder, inputs, masked):
    model, folder = umt5_folder
    ours = load_t5_encoder(folder)
    assert ours.cfg.per_layer_bias
    assert ours.blocks.attn.relative_attention_bias.embedding.shape == (TINY["num_layers"], 8, 4)
    ids, mask = inputs
    mask = mask if masked else None
    err = assert_close(run(ours, ids, mask), _reference(torch, model, ids, mask), what="umt5")
    print(f"umt5 mask={masked}: max abs err {err:.2e}")


@pytest.mark.torch
def test_full_encoder_decoder_checkpoint(torch, tmp_path, inputs):
    """T5ForConditionalGeneration checkpoints load: decoder.* / lm_head.* are skipped, nothing else."""
    tf = _transformers()
    torch.manual_seed(1)
    model = tf.T5ForConditionalGeneration(tf.T5Config(**TINY)).eval()
    _randomize_norms(torch, model)
    model.save_pretrained(tmp_path / "full")
    keys = set(open_checkpoint(tmp_path / "full"))
    assert any(k.startswith("decoder.") for k in keys)
    ours = load_t5_encoder(tmp_path / "full")
    ids, mask = inputs
    err = assert_close(run(ours, ids, mask), _reference(torch, model.get_encoder(), ids, mask), what="t5 full")
    print(f"t5 from T5ForConditionalGeneration: max abs err {err:.2e}")


@pytest.mark.torch
def test_relu_t5_and_bfloat16(torch, tmp_path, inputs):
    """Original-T5 (non-gated ReLU) layout; and a bfloat16 load stays close to float32."""
    tf = _transformers()
    torch.manual_seed(2)
    model = tf.T5EncoderModel(tf.T5Config(**{**TINY, "feed_forward_proj": "relu"})).eval()
    _randomize_norms(torch, model)
    model.save_pretrained(tmp_path / "relu")
    ids, mask = inputs
    ours = load_t5_encoder(tmp_path / "relu")
    ref = _reference(torch, model, ids, mask)
    err = assert_close(run(ours, ids, mask), ref, what="t5 relu")
    print(f"t5 relu: max abs err {err:.2e}")
    low = load_t5_encoder(tmp_path / "relu", param_dtype="bfloat16", dtype="bfloat16")
    out = run(low, ids, mask)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, rel=5e-2, what="t5 relu bfloat16")


# --- strict loading ----------------------------------------------------------------------------

def _write(folder, tensors, config_from):
    folder.mkdir()
    shutil.copy(config_from / "config.json", folder / "config.json")
    save_safetensors(folder / "model.safetensors", tensors)
    return folder


@pytest.fixture(scope="module")
def t5_tensors(t5_folders):
    _, root = t5_folders
    return {k: np.array(v) for k, v in open_checkpoint(root / "single").items()}, root / "single"


@pytest.mark.torch
def test_tied_embedding_keys(t5_tensors, tmp_path):
    tensors, src = t5_tensors
    emb = tensors["shared.weight"]
    both = _write(tmp_path / "both", {**tensors, "encoder.embed_tokens.weight": emb}, src)
    only_encoder = {k: v for k, v in tensors.items() if k != "shared.weight"}
    alt = _write(tmp_path / "alt", {**only_encoder, "encoder.embed_tokens.weight": emb}, src)
    for folder in (both, alt):
        m = load_t5_encoder(folder)
        np.testing.assert_array_equal(np.asarray(m.embed_tokens.embedding[...]), emb)


@pytest.mark.torch
def test_missing_key(t5_tensors, tmp_path):
    tensors, src = t5_tensors
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    folder = _write(tmp_path / "m", {k: v for k, v in tensors.items() if k != key}, src)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_t5_encoder(folder)


@pytest.mark.torch
def test_unexpected_key(t5_tensors, tmp_path):
    tensors, src = t5_tensors
    # a per-layer bias table (UMT5 layout) under a T5 config is unexpected
    key = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"
    folder = _write(tmp_path / "u", {**tensors, key: np.zeros((8, 4), np.float32)}, src)
    with pytest.raises(CheckpointError, match="unexpected keys.*" + key.replace(".", r"\.")):
        load_t5_encoder(folder)


@pytest.mark.torch
@pytest.mark.parametrize("key,shape", [
    ("encoder.block.1.layer.0.SelfAttention.q.weight", (16, 32)),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4)),
    ("shared.weight", (98, 32)),
    ("encoder.final_layer_norm.weight", (33,)),
])
def test_wrong_shape(t5_tensors, tmp_path, key, shape):
    tensors, src = t5_tensors
    folder = _write(tmp_path / "s", {**tensors, key: np.zeros(shape, np.float32)}, src)
    with pytest.raises(CheckpointError, match=r"shape mismatch for " + key.replace(".", r"\.")):
        load_t5_encoder(folder)


@pytest.mark.torch
def test_umt5_checkpoint_with_t5_config(umt5_folder, tmp_path):
    _, folder = umt5_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "t5"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_t5_encoder(bad)


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json"):
        load_t5_encoder(tmp_path)


def test_config():
    xxl = T5Config.from_dict({"model_type": "t5", "d_model": 4096, "d_ff": 10240, "num_heads": 64,
                              "num_layers": 24, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.1,
                              "architectures": ["T5EncoderModel"]}, dtype="bfloat16")
    assert (xxl.is_gated, xxl.activation, xxl.per_layer_bias, xxl.inner_dim) == (True, "gelu_new", False, 4096)
    assert xxl.dtype == "bfloat16"
    assert T5Config.from_dict({"model_type": "umt5"}).per_layer_bias
    with pytest.raises(ConfigError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-relu-x")
    with pytest.raises(ConfigError, match="remat"):
        T5Config(remat="sometimes")
    with pytest.raises(ConfigError, match="model_type"):
        T5Config.from_dict({"model_type": "bert"})


def test_scanned_layers_shapes():
    """Layers are stacked with a leading layer axis; T5 has one bias table, UMT5 one per layer."""
    cfg = T5Config(**{k: v for k, v in TINY.items() if k != "dropout_rate"})
    m = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    assert m.blocks.attn.q.kernel.shape == (2, 32, 32)
    assert m.blocks.ff.wi_0.kernel.shape == (2, 32, 64)
    assert m.relative_attention_bias.embedding.shape == (8, 4)
    u = nnx.eval_shape(lambda: T5Encoder(T5Config(**{**cfg.__dict__, "model_type": "umt5", "per_layer_bias": None}),
                                         rngs=nnx.Rngs(0)))
    assert u.blocks.attn.relative_attention_bias.embedding.shape == (2, 8, 4)
    assert not hasattr(u, "relative_attention_bias")
