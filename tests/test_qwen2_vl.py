"""Qwen2-VL (vision tower + language model) against transformers' Qwen2-VL at a tiny random config
saved with ``save_pretrained`` (the released key layout) and loaded by our loader: vision tower,
language model (1-D RoPE with a padding mask, M-RoPE), the whole model with video tokens, the
transformers-5 key layout, the 2B preset built abstractly, strict loading errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.qwen2_vl import (
    PRESETS,
    Qwen2VLConfig,
    Qwen2VLModel,
    convert_hf,
    from_pretrained,
    load_params,
    mrope_position_ids,
    preset,
)
from vipo_jax.weights.loading import abstract_params
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors

VIDEO, VSTART, VEND, IMAGE = 251, 252, 253, 250
TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=None, eos_token_id=None,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0))
VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
GRID = (2, 4, 6)  # t, h, w patches: 48 patches, 12 merged tokens per video
ERRORS: dict[str, float] = {}


def _transformers():
    import transformers

    return transformers


@pytest.fixture(scope="module")
def hf(torch, tmp_path_factory):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.Qwen2VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
    model = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms at 1 / biases at 0 would hide a mixed-up parameter
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(root / "hf")
    return model, root


@pytest.fixture(scope="module")
def ours(hf):
    return from_pretrained(hf[1] / "hf")


@pytest.fixture(scope="module")
def fwd():
    """Jitted forwards (graphdef static): one compile per function and shape."""

    @jax.jit
    def vision(state, graphdef, pixels):
        return nnx.merge(graphdef, state).visual(pixels, GRID)

    @jax.jit
    def text(state, graphdef, ids, mask, pos):
        return nnx.merge(graphdef, state).language_model(ids, attention_mask=mask, position_ids=pos)

    @jax.jit
    def full(state, graphdef, ids, pixels, pos):
        return nnx.merge(graphdef, state)(ids, pixels, GRID, position_ids=pos)

    def call(fn, model, *args):
        graphdef, state = nnx.split(model)
        return np.asarray(fn(state, graphdef, *args))

    return {"vision": lambda m, *a: call(vision, m, *a), "text": lambda m, *a: call(text, m, *a),
            "full": lambda m, *a: call(full, m, *a)}


def _video_ids(rng: np.random.Generator, n_video: int) -> np.ndarray:
    """Two rows: text, <vision_start>, n_video video tokens, <vision_end>, text; row 1 right-padded."""
    pre, post = 5, 9
    ids = rng.integers(0, 240, size=(2, pre + n_video + 2 + post)).astype(np.int64)
    ids[:, pre] = VSTART
    ids[:, pre + 1:pre + 1 + n_video] = VIDEO
    ids[:, pre + 1 + n_video] = VEND
    return ids


@pytest.mark.torch
def test_vision_tower_parity(torch, hf, ours, fwd):
    model = hf[0]
    pixels = np.random.default_rng(0).normal(size=(2, np.prod(GRID), 3 * 2 * 14 * 14)).astype(np.float32)
    with torch.no_grad():
        ref = model.model.visual(torch.from_numpy(pixels.reshape(-1, pixels.shape[-1])),
                                 grid_thw=torch.tensor([GRID, GRID])).pooler_output.numpy()
    out = fwd["vision"](ours, jnp.asarray(pixels))
    assert out.shape == (2, np.prod(GRID) // 4, 64)
    ERRORS["vision"] = assert_close(out.reshape(ref.shape), ref, what="vision tower")


@pytest.mark.torch
def test_text_model_parity_with_padding(torch, hf, ours, fwd):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 250, size=(2, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 14:] = 0
    with torch.no_grad():
        ref = hf[0].model.language_model(input_ids=torch.from_numpy(ids),
                                         attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    out = fwd["text"](ours, jnp.asarray(ids), jnp.asarray(mask), None)
    ERRORS["text"] = assert_close(out, ref, what="language model")


@pytest.mark.torch
def test_mrope_positions_and_parity(torch, hf, ours, fwd):
    """Our host M-RoPE ids equal transformers' get_rope_index (t <= h/2 and w/2, where 4.45 and
    transformers 5 agree), and the language model matches with them."""
    model = hf[0]
    n_video = GRID[0] * GRID[1] * GRID[2] // 4
    ids = _video_ids(np.random.default_rng(2), n_video)
    mask = np.ones_like(ids)
    mask[1, -3:] = 0
    ours_pos = mrope_position_ids(ids, GRID, video_token_id=VIDEO, spatial_merge_size=2, attention_mask=mask)
    types = (ids == VIDEO).astype(np.int64) * 2
    with torch.no_grad():
        ref_pos, _ = model.model.get_rope_index(torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(types),
                                                video_grid_thw=torch.tensor([GRID, GRID]),
                                                attention_mask=torch.from_numpy(mask))
    valid = mask.astype(bool)
    np.testing.assert_array_equal(ours_pos[:, valid], ref_pos.numpy()[:, valid])
    with torch.no_grad():
        ref = model.model.language_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                          position_ids=torch.from_numpy(ours_pos)).last_hidden_state.numpy()
    out = fwd["text"](ours, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(ours_pos))
    ERRORS["mrope"] = assert_close(out, ref, what="language model with M-RoPE ids")


@pytest.mark.torch
def test_full_model_with_video_tokens(torch, hf, ours, fwd):
    """Video embeddings scattered into the placeholders, 1-D positions (how VideoAlign runs it)."""
    model = hf[0]
    n_video = GRID[0] * GRID[1] * GRID[2] // 4
    ids = _video_ids(np.random.default_rng(3), n_video)
    pixels = np.random.default_rng(4).normal(size=(2, np.prod(GRID), 3 * 2 * 14 * 14)).astype(np.float32)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    with torch.no_grad():
        ref = model.model(input_ids=torch.from_numpy(ids),
                          pixel_values_videos=torch.from_numpy(pixels.reshape(-1, pixels.shape[-1])),
                          video_grid_thw=torch.tensor([GRID, GRID]),
                          position_ids=torch.from_numpy(pos)).last_hidden_state.numpy()
    out = fwd["full"](ours, jnp.asarray(ids), jnp.asarray(pixels), None)
    ERRORS["full"] = assert_close(out, ref, what="Qwen2-VL with video")


@pytest.mark.torch
def test_transformers5_key_layout(hf, ours):
    """The in-memory transformers-5 names (model.visual.*, model.language_model.*) convert to the
    same parameters as the released layout on disk."""
    sd = {k: v.detach().numpy() for k, v in hf[0].state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd)
    params = convert_hf(sd, ours.config)
    ref = convert_hf(open_checkpoint(hf[1] / "hf" / "model.safetensors"), ours.config)
    assert params.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(params[k], ref[k], err_msg=k)


def test_preset_2b_builds_abstractly():
    cfg = preset("qwen2-vl-2b", param_dtype="bfloat16")
    assert cfg.text_config.head_dim == 128 and cfg.text_config.mrope_section == (16, 24, 24)
    assert cfg.vision_config.in_channels == 3 and cfg.vision_config.embed_dim == 1280
    model = nnx.eval_shape(lambda: Qwen2VLModel(cfg, rngs=nnx.Rngs(0)))
    shapes = abstract_params(model)
    n = sum(int(np.prod(s.shape)) for s in shapes.values())
    # Qwen2-VL-2B-Instruct: 2.21e9 parameters with the tied LM head counted once (this port has none)
    assert 2.20e9 < n < 2.22e9, n
    assert shapes["language_model.embed_tokens.embedding"].shape == (151936, 1536)
    assert shapes["language_model.layers.self_attn.k_proj.kernel"].shape == (28, 1536, 256)
    assert shapes["visual.blocks.attn.qkv.kernel"].shape == (32, 1280, 3840)
    assert shapes["visual.patch_embed.kernel"].shape == (1176, 1280)
    assert shapes["visual.merger.fc2.kernel"].shape == (5120, 1536)
    assert all(s.dtype == jnp.bfloat16 for s in shapes.values())
    # parameters carry logical axis names (docs/PORTING.md)
    _, state = nnx.split(model)
    names = {".".join(map(str, p)): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(state)}
    assert names["language_model.layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert names["language_model.embed_tokens.embedding"] == ("vocab", "embed")
    assert names["visual.blocks.norm1.scale"] == ("layers", "norm")


def test_config_layouts():
    flat = Qwen2VLConfig.from_dict(PRESETS["qwen2-vl-2b"])
    nested = Qwen2VLConfig.from_dict(flat.to_dict())
    assert nested == flat
    assert flat.video_token_id == 151656 and flat.text_config.rope_theta == 1e6
    with pytest.raises(ConfigError, match="mrope_section"):
        Qwen2VLConfig.from_dict({**PRESETS["qwen2-vl-2b"], "rope_scaling": {"type": "mrope",
                                                                           "mrope_section": [16, 24, 20]}})
    with pytest.raises(ConfigError, match="unknown option"):
        preset("qwen2-vl-2b", remat_policy="full")


@pytest.mark.torch
def test_loading_errors(hf, tmp_path):
    src = hf[1] / "hf"
    cfg = Qwen2VLConfig.from_pretrained(src)
    tensors = dict(open_checkpoint(src / "model.safetensors").items())
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(CheckpointError, match="missing key 'model.layers.1.mlp.up_proj.weight'"):
        load_params(cfg, missing, where="t")
    extra = {**tensors, "visual.blocks.0.attn.extra": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_params(cfg, extra, where="t")
    bad = dict(tensors)
    bad["visual.merger.mlp.0.bias"] = np.zeros(7, np.float32)
    with pytest.raises(CheckpointError, match="shape mismatch for 'visual.merger.mlp.0.bias'"):
        load_params(cfg, bad, where="t")
    folder = tmp_path / "wrong"
    shutil.copytree(src, folder)
    d = json.loads((folder / "config.json").read_text())
    d["text_config"]["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        from_pretrained(folder)
    with pytest.raises(CheckpointError, match="no config.json"):
        from_pretrained(tmp_path / "nowhere")
    save_safetensors(tmp_path / "model.safetensors", {"foo": np.zeros(2, np.float32)})
    with pytest.raises(CheckpointError, match="not a Qwen2-VL checkpoint"):
        convert_hf(open_checkpoint(tmp_path / "model.safetensors"), cfg)


def test_report_errors():
    if ERRORS:
        print("\nQwen2-VL parity, max abs error:", {k: f"{v:.2e}" for k, v in ERRORS.items()})
