"""CLIP: parity with transformers CLIPModel / CLIPTextModel and open_clip CLIP (HPSv2 layout), the
.pt -> safetensors converter, on-device reward preprocessing, strict loading errors."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close, import_open_clip
from vipo_jax.convert import main as convert_main
from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.models.clip import OPEN_CLIP_CONFIGS, CLIPConfig, config_from_open_clip
from vipo_jax.models.clip import from_pretrained as load_clip
from vipo_jax.models.clip.convert import convert_open_clip_checkpoint
from vipo_jax.rewards.clip_scores import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CLIPRewardModel,
    hps_v21_score,
    preprocess,
)
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors
from vipo_jax.weights.torch_pickle import load_torch_state_dict

REPO = Path(__file__).resolve().parent.parent
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=1, projection_dim=16)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)
OC_CFG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
          "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 32, "heads": 4, "layers": 2}}
ERRORS: dict[str, float] = {}


# --- jitted forwards (split graphdef static, so each model config compiles once) ----------------
@functools.partial(jax.jit, static_argnums=0)
def _text(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, ids, mask, pixels):
    m = nnx.merge(graphdef, state)
    return m.get_text_features(ids, mask), m.get_image_features(pixels), m(ids, pixels, mask)[0]


@functools.partial(jax.jit, static_argnums=0)
def _hps(graphdef, state, images, ids):
    m = nnx.merge(graphdef, state)
    return m.get_text_features(ids), m.get_image_features(preprocess(images, 32)), \
        hps_v21_score(m, images, ids)


def _run(fn, model, *args):
    graphdef, state = nnx.split(model)
    out = fn(graphdef, state, *(None if a is None else jnp.asarray(a) for a in args))
    return jax.tree.map(np.asarray, out)


def _transformers():
    import_open_clip()  # installs the torchvision shim transformers needs too
    import transformers

    return transformers


def _perturb(torch, model, seed):
    # Reference inits leave norms at 1 / 0 and many biases at 0: randomise everything so a mixed-up
    # or transposed parameter is caught.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _torch_preprocess(torch, images, size, clamp=True):
    """Reference: torch bicubic antialiased resize of the shortest side, centre crop, normalise."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(images, np.float32)).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if clamp:
        x = x.clamp(0, 1)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    if clamp:
        x = x.clamp(0, 1)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 90, size=(2, 10)).astype(np.int64)
    ids[:, 0] = 97
    ids[0, 5], ids[0, 6:] = 98, 1  # padded row
    ids[1, 9] = 98
    mask = (np.arange(10)[None] < np.array([[6], [10]])).astype(np.int64)
    return ids, mask


@pytest.fixture(scope="module")
def hf(torch, tmp_path_factory):
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    model = tf.CLIPModel(cfg).eval()
    _perturb(torch, model, 1)
    root = tmp_path_factory.mktemp("clip_hf")
    model.save_pretrained(root / "clip")
    model.text_model.save_pretrained(root / "text")  # v5 layout: keys without "text_model."
    return model, root


@pytest.fixture(scope="module")
def ours_hf(hf):
    return load_clip(hf[1] / "clip")


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_reference(torch, hf, text_inputs, pixels):
    model = hf[0]
    ids, mask = (torch.from_numpy(a) for a in text_inputs)
    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        t = model.text_model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
        return dict(hidden=t.last_hidden_state.numpy(), pooled=t.pooler_output.numpy(),
                    text_feat=model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.numpy(),
                    image_feat=model.get_image_features(pixel_values=px).pooler_output.numpy(),
                    logits=out.logits_per_image.numpy())


@pytest.fixture(scope="module")
def open_clip_ckpt(torch, tmp_path_factory):
    open_clip = import_open_clip()
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=OC_CFG["embed_dim"], vision_cfg=OC_CFG["vision_cfg"],
                                 text_cfg=OC_CFG["text_cfg"], quick_gelu=False).eval()
    _perturb(torch, model, 2)
    root = tmp_path_factory.mktemp("clip_oc")
    pt = root / "hps_tiny.pt"
    # HPSv2 checkpoints nest the weights under "state_dict"; also exercise a DDP "module." prefix.
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, pt)
    (root / "oc.json").write_text(json.dumps(OC_CFG))
    dst = root / "hps_tiny.safetensors"
    convert_open_clip_checkpoint(pt, dst, config=OC_CFG)
    return model, root, dst


# --- transformers parity ---------------------------------------------------------------------------
@pytest.mark.torch
def test_hf_text_parity(ours_hf, hf_reference, text_inputs):
    hidden, pooled = _run(_text, ours_hf.text_model, *text_inputs)
    ERRORS["hf text hidden"] = assert_close(hidden, hf_reference["hidden"], what="last_hidden_state")
    ERRORS["hf text pooled"] = assert_close(pooled, hf_reference["pooled"], what="pooled_output")


@pytest.mark.torch
def test_hf_features_and_logits(ours_hf, hf_reference, text_inputs, pixels):
    text_feat, image_feat, logits = _run(_features, ours_hf, *text_inputs, pixels)
    ERRORS["hf text features"] = assert_close(text_feat, hf_reference["text_feat"], what="text features")
    ERRORS["hf image features"] = assert_close(image_feat, hf_reference["image_feat"], what="image features")
    ERRORS["hf logits"] = assert_close(logits, hf_reference["logits"], what="logits_per_image")


@pytest.mark.torch
def test_load_clip_text_v5_layout(hf, hf_reference, text_inputs):
    model = load_clip(hf[1] / "text", component="text")
    hidden, pooled = _run(_text, model, *text_inputs)
    ERRORS["text-only hidden"] = assert_close(hidden, hf_reference["hidden"], what="last_hidden_state")
    assert_close(pooled, hf_reference["pooled"], what="pooled_output")


@pytest.mark.torch
def test_text_legacy_eos_and_prefix(torch, tmp_path):
    """eos_token_id == 2 (FLUX's openai/clip-vit-large-patch14 config): pooled at argmax(ids), keys
    saved with the legacy ``text_model.`` prefix; a CLIPTextModelWithProjection drops its projection."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.CLIPTextConfig(**{**TEXT, "eos_token_id": 2})
    ref = tf.CLIPTextModelWithProjection(cfg).eval()
    _perturb(torch, ref, 3)
    ref.save_pretrained(tmp_path)
    sd = open_checkpoint(tmp_path / "model.safetensors")
    assert "text_model.embeddings.token_embedding.weight" in sd and "text_projection.weight" in sd
    # Older transformers also wrote the position_ids buffer (FLUX's text_encoder has it).
    tensors = {k: np.array(v) for k, v in sd.items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_safetensors(tmp_path / "model.safetensors", tensors)
    ids = np.array([[97, 2, 5, 98, 3, 1, 1, 1], [97, 7, 2, 9, 10, 98, 2, 2]], np.int64)
    with torch.no_grad():
        r = ref.text_model(input_ids=torch.from_numpy(ids))
    assert not np.allclose(r.pooler_output[0].numpy(), r.last_hidden_state[0, 1].numpy())
    model = load_clip(tmp_path, component="text")
    assert model.cfg.pooling_rule == "argmax"
    hidden, pooled = _run(_text, model, ids, None)
    ERRORS["legacy text hidden"] = assert_close(hidden, r.last_hidden_state.numpy(), what="hidden")
    ERRORS["legacy text pooled"] = assert_close(pooled, r.pooler_output.numpy(), what="pooled (argmax)")


# --- open_clip / HPS parity ------------------------------------------------------------------------
@pytest.mark.torch
def test_open_clip_convert_and_hps(torch, open_clip_ckpt):
    ref, _, dst = open_clip_ckpt
    written = json.loads(dst.with_suffix(".json").read_text())
    assert written["layout"] == "open_clip" and written["text_config"]["pooling"] == "argmax"
    assert written["vision_config"]["hidden_act"] == "gelu"
    model = load_clip(dst)
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(2, 48, 40, 3)).astype(np.float32)  # portrait: resize + crop
    ids = np.zeros((2, 16), np.int64)  # open_clip pads with 0, EOT (98) has the largest id
    ids[0, :5] = [97, 5, 6, 7, 98]
    ids[1, :9] = [97, 11, 12, 13, 14, 15, 16, 17, 98]
    text_feat, image_feat, score = _run(_hps, model, images, ids)
    with torch.no_grad():
        px = _torch_preprocess(torch, images, 32)
        r_img = ref.encode_image(px)
        r_txt = ref.encode_text(torch.from_numpy(ids))
        r_score = (torch.nn.functional.normalize(r_img, dim=-1)
                   * torch.nn.functional.normalize(r_txt, dim=-1)).sum(-1)
    ERRORS["open_clip text features"] = assert_close(text_feat, r_txt.numpy(), what="encode_text")
    ERRORS["open_clip image features"] = assert_close(image_feat, r_img.numpy(), what="encode_image")
    ERRORS["hps score"] = assert_close(score, r_score.numpy(), what="HPS score")


@pytest.mark.torch
def test_convert_cli_subprocess(open_clip_ckpt, tmp_path):
    _, root, _ = open_clip_ckpt
    dst = tmp_path / "cli.safetensors"
    proc = subprocess.run([sys.executable, "-m", "vipo_jax.convert", "hps", "--src", str(root / "hps_tiny.pt"),
                           "--dst", str(dst), "--config", str(root / "oc.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert dst.is_file() and dst.with_suffix(".json").is_file()
    assert "visual.conv1.weight" in open_checkpoint(dst)


@pytest.mark.torch
def test_pickscore_and_clip_score_wrapper(torch, hf, ours_hf):
    """CLIPRewardModel on the transformers model: PickScore = exp(logit_scale) * cosine, CLIP score =
    100 * max(cosine, 0); one prompt per image picked by index."""
    model = hf[0]
    rng = np.random.default_rng(3)
    images = rng.uniform(size=(3, 40, 40, 3)).astype(np.float32)
    prompts = np.full((2, 8), 1, np.int64)
    prompts[0, :4] = [97, 5, 6, 98]
    prompts[1, :6] = [97, 8, 9, 10, 11, 98]
    index = np.array([1, 0, 1])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=_torch_preprocess(torch, images, 32)).pooler_output
        txt = model.get_text_features(input_ids=torch.from_numpy(prompts)).pooler_output
        cos = (torch.nn.functional.normalize(img, dim=-1)
               * torch.nn.functional.normalize(txt, dim=-1)[torch.from_numpy(index)]).sum(-1)
        pick = (model.logit_scale.exp() * cos).numpy()
    reward = CLIPRewardModel(ours_hf, prompts, kind="pickscore")
    ERRORS["pickscore"] = assert_close(reward(images, index), pick, what="PickScore")
    reward.kind = "clip_score"
    assert_close(reward(images, index), 100 * np.maximum(cos.numpy(), 0), what="CLIP score")


# --- preprocessing ---------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("shape", [(2, 48, 40, 3), (1, 37, 64, 3), (2, 20, 20, 3)])
def test_preprocess_matches_torch_bicubic_antialias(torch, shape):
    """jax.image.resize(bicubic, antialias) vs torch F.interpolate(bicubic, antialias=True): same
    kernel and border renormalisation, agreement to float32 rounding (stated tolerance 1e-5 in
    normalised units, i.e. ~3e-6 in [0, 1] pixel units)."""
    images = np.random.default_rng(4).uniform(-0.05, 1.05, size=shape).astype(np.float32)
    for clamp in (True, False):
        ours = np.asarray(preprocess(jnp.asarray(images), 32, clamp=clamp))
        ref = _torch_preprocess(torch, images, 32, clamp=clamp).permute(0, 2, 3, 1).numpy()
        err = assert_close(ours, ref, rel=1e-5 / max(1.0, float(np.abs(ref).max())), what="preprocess")
        ERRORS[f"preprocess {shape[1]}x{shape[2]} clamp={clamp}"] = err


# --- configs ---------------------------------------------------------------------------------------
def test_open_clip_config_mapping():
    cfg = config_from_open_clip(OPEN_CLIP_CONFIGS["ViT-H-14"])
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_attention_heads, v.num_hidden_layers, v.patch_size) == (1280, 16, 32, 14)
    assert (t.hidden_size, t.num_attention_heads, t.intermediate_size) == (1024, 16, 4096)
    assert v.hidden_act == t.hidden_act == "gelu" and t.pooling_rule == "argmax"
    assert cfg.projection_dim == 1024
    assert config_from_open_clip({**OC_CFG, "quick_gelu": True}).text_config.hidden_act == "quick_gelu"
    rt = CLIPConfig.from_dict(cfg.to_dict(), dtype="bfloat16", remat="full")
    assert rt.text_config == t.replace(dtype="bfloat16", remat="full")
    with pytest.raises(ConfigError, match="ls_init_value"):
        config_from_open_clip({**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "ls_init_value": 1e-5}})
    with pytest.raises(ConfigError, match="ModifiedResNet"):
        config_from_open_clip({**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "layers": [3, 4, 6, 3]}})
    old_style = {"text_config": {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": 2},
                 "text_config_dict": {"hidden_act": "gelu"}, "vision_config": None}
    t2 = CLIPConfig.from_dict(old_style).text_config
    assert (t2.hidden_size, t2.hidden_act, t2.pooling_rule) == (64, "gelu", "argmax")
    with pytest.raises(ConfigError, match="unknown option"):
        CLIPConfig.from_dict(cfg.to_dict(), not_a_field=1)


# --- strict loading errors -------------------------------------------------------------------------
def _copy_with(src_folder: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src_folder / "config.json", dst / "config.json")
    tensors = {k: np.array(v) for k, v in open_checkpoint(src_folder / "model.safetensors").items()}
    edit(tensors)
    save_safetensors(dst / "model.safetensors", tensors)
    return dst


@pytest.mark.torch
def test_missing_key(hf, tmp_path):
    folder = _copy_with(hf[1] / "clip", tmp_path / "m", lambda t: t.pop("visual_projection.weight"))
    with pytest.raises(CheckpointError, match="missing key 'visual_projection.weight'"):
        load_clip(folder)


@pytest.mark.torch
def test_unexpected_key(hf, tmp_path):
    def add(t):
        t["text_model.encoder.layers.2.mlp.fc1.weight"] = t["text_model.encoder.layers.1.mlp.fc1.weight"]

    folder = _copy_with(hf[1] / "clip", tmp_path / "u", add)
    with pytest.raises(CheckpointError, match="unexpected keys.*layers.2.mlp.fc1"):
        load_clip(folder)


@pytest.mark.torch
def test_wrong_shape(hf, tmp_path):
    def bad(t):
        t["text_projection.weight"] = np.zeros((16, 31), np.float32)

    folder = _copy_with(hf[1] / "clip", tmp_path / "s", bad)
    with pytest.raises(CheckpointError, match=r"shape mismatch for text_projection.kernel.*\(31, 16\)"):
        load_clip(folder)


@pytest.mark.torch
def test_missing_config(hf, tmp_path):
    (tmp_path / "t").mkdir()
    shutil.copy(hf[1] / "text" / "model.safetensors", tmp_path / "t" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_clip(tmp_path / "t", component="text")
    with pytest.raises(CheckpointError, match="no CLIP config"):
        load_clip(tmp_path / "t")


@pytest.mark.torch
def test_convert_rejects_non_checkpoints(torch, open_clip_ckpt, tmp_path, capsys, monkeypatch):
    junk = tmp_path / "junk.pt"
    junk.write_text("this is not a pickle\n")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # as if torch were not installed
        with pytest.raises(CheckpointError, match="needs torch, which is not installed"):
            load_torch_state_dict(junk)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert_open_clip_checkpoint(junk, tmp_path / "x.safetensors", config=OC_CFG)
    assert convert_main(["hps", "--src", str(junk), "--dst", str(tmp_path / "x.safetensors")]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    notdict = tmp_path / "list.pt"
    torch.save([1, 2, 3], notdict)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        convert_open_clip_checkpoint(notdict, tmp_path / "x.safetensors", config=OC_CFG)
    # A real checkpoint converted against the wrong architecture names the offending key.
    with pytest.raises(CheckpointError, match="missing key 'visual.transformer.resblocks.2"):
        convert_open_clip_checkpoint(open_clip_ckpt[1] / "hps_tiny.pt", tmp_path / "x.safetensors",
                                     config={**OC_CFG, "vision_cfg": {**OC_CFG["vision_cfg"], "layers": 3}})
    assert not (tmp_path / "x.safetensors").exists()


def test_zz_report():
    """Prints the measured errors (run with -s)."""
    for k, v in ERRORS.items():
        print(f"max abs err {k}: {v:.2e}")
