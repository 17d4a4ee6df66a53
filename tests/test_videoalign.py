"""VideoAlign: end-to-end reward scores against a reference of VideoAlign's forward written here
with torch + transformers, at a tiny random Qwen2-VL.

The reference follows VideoAlign's inference code (``inference.py`` / ``vision_process.py`` /
``trainer.Qwen2VLRewardModelBT.forward`` at transformers 4.45.2): uint8 frames sampled at
``torch.linspace(0, T - 1, n).round()``, resized with ``torchvision`` BICUBIC antialias, the
Qwen2-VL processor (chat template, video placeholder expansion, rescale / normalise / patchify),
the base model with the LoRA applied unmerged (forward hooks, as PEFT runs it), video embeddings
``masked_scatter``-ed into the placeholders, the language model called without position ids (1-D
positions), ``rm_head`` read at the three reward tokens, ``use_norm`` z-scoring. The checkpoint
folder is written in the release's layout: ``model_config.json``, ``checkpoint-N/model.pth`` (a
full PEFT state dict, transformers-4.45 key names, converted with
``convert_videoalign_checkpoint``), the base model beside it, plus the PEFT adapter layout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.utils import assert_close
from vipo_jax.errors import CheckpointError, ConfigError, DataError
from vipo_jax.models.qwen2_vl import preset
from vipo_jax.rewards import videoalign as va
from vipo_jax.rewards.videoalign import (
    QWEN2_VL_STD,
    VideoAlignScorer,
    VideoAlignSettings,
    build_chat_text,
    build_prompt,
    load_videoalign,
    make_score_fn,
    preprocess_videos,
    read_rewards,
    sample_frame_indices,
    smart_resize,
)
from vipo_jax.weights.safetensors_io import open_checkpoint, save_safetensors

# Qwen/Qwen2-VL-2B-Instruct's chat template (tokenizer_config.json): the reference renders with it.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                 "<|image_pad|>", "<|video_pad|>"]
REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
RANK, ALPHA = 4, 8.0
MEAN = {"VQ": 3.6757, "MQ": 1.1646, "TA": 2.8105}  # the release's inference_config
STD = {"VQ": 2.2476, "MQ": 1.3811, "TA": 2.5121}
CLIPS = dict(num_frames=17, height=60, width=84, fps=8.0)  # -> 4 frames at 280 x 392, grid (2, 20, 28)
PROMPTS = ["a red cat walks on the blue sky", "the camera follows a dog {in} a house"]
ERRORS: dict[str, float] = {}


def model_config_json(output_dim: int = 1) -> dict:
    """VideoAlign's model_config.json, as train_reward.py writes it (the release's values)."""
    return {
        "data_config": {"meta_data": "/path/meta.csv", "data_dir": "/path", "meta_data_test": None,
                        "max_frame_pixels": 200704, "num_frames": None, "fps": 2.0, "p_shuffle_frames": 0.0,
                        "p_color_jitter": 0.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "add_noise": False, "sample_type": "uniform",
                        "use_tied_data": True},
        "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": output_dim,
                         "use_special_tokens": True, "reward_token": "special", "torch_dtype": "bfloat16"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": RANK, "lora_alpha": ALPHA,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                             "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                             "num_lora_modules": -1},
        "inference_config": {f"{k}_{s}": v[k] for k in ("VQ", "MQ", "TA") for s, v in (("mean", MEAN), ("std", STD))},
    }


def _tokenizer():
    """A tiny byte-level BPE with Qwen2-VL's special tokens (the base tokenizer: no reward tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator([build_prompt(p) for p in PROMPTS], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def _legacy_name(key: str) -> str:
    """transformers-5 module names -> the 4.45 names VideoAlign's checkpoint has."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


@pytest.fixture(scope="module")
def world(torch, tmp_path_factory):
    """The reference model (torch) and the checkpoint folders in the release's layouts."""
    import transformers as tf

    root = tmp_path_factory.mktemp("videoalign")
    tok = _tokenizer()
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS), strict=True))
    v0 = len(tok)
    torch.manual_seed(0)
    cfg = tf.Qwen2VLConfig(
        text_config=dict(vocab_size=v0 + 5, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None,
                         eos_token_id=None, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                                 rope_theta=1e6)),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    base = tf.Qwen2VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    (root / "base").mkdir()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")

    # the reward model: VideoAlign adds the tokens, resizes the embeddings, trains the vision tower,
    # the new token embeddings, rm_head and a LoRA on every Linear of the language model
    tok.add_special_tokens({"additional_special_tokens": REWARD_TOKENS})
    reward = copy.deepcopy(base)
    reward.resize_token_embeddings(len(tok))
    with torch.no_grad():
        for p in [*reward.model.visual.parameters(), reward.model.language_model.embed_tokens.weight]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    rm_head = 0.3 * torch.randn(1, 64, generator=g)
    lora = {}
    for i, layer in enumerate(reward.model.language_model.layers):
        for name in LINEARS:
            mod = layer.get_submodule(name)
            lora[f"model.layers.{i}.{name}"] = (mod, 0.2 * torch.randn(RANK, mod.in_features, generator=g),
                                                0.2 * torch.randn(mod.out_features, RANK, generator=g))

    # full PEFT state dict (checkpoint-N/model.pth), transformers-4.45 names
    sd = {}
    for k, v in reward.state_dict().items():
        k = _legacy_name(k)
        module = k.rsplit(".", 1)[0]
        if module in lora:
            k = f"{module}.base_layer.{k.rsplit('.', 1)[1]}"
        sd["base_model.model." + k] = v.clone()
    for module, (_, a, b) in lora.items():
        sd[f"base_model.model.{module}.lora_A.default.weight"] = a
        sd[f"base_model.model.{module}.lora_B.default.weight"] = b
    sd["base_model.model.rm_head.weight"] = rm_head
    full = root / "full"
    (full / "checkpoint-7").mkdir(parents=True)
    (full / "checkpoint-3").mkdir()  # an older checkpoint: the newest is used
    (full / "model_config.json").write_text(json.dumps(model_config_json(), indent=4))
    torch.save(sd, full / "checkpoint-7" / "model.pth")
    written = va.convert_videoalign_checkpoint(full)
    shutil.copytree(root / "base", full / "base")

    # PEFT adapter layout: adapter_model.safetensors + non_lora_state_dict, over the base weights
    adapter = root / "adapter"
    (adapter / "checkpoint-7").mkdir(parents=True)
    (adapter / "model_config.json").write_text(json.dumps(model_config_json(), indent=4))
    ad = {}
    for module, (_, a, b) in lora.items():
        ad[f"base_model.model.{module}.lora_A.weight"] = a.numpy()
        ad[f"base_model.model.{module}.lora_B.weight"] = b.numpy()
    save_safetensors(adapter / "checkpoint-7" / "adapter_model.safetensors", ad)
    (adapter / "checkpoint-7" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": False, "bias": "none",
         "target_modules": sorted(lora), "task_type": "CAUSAL_LM"}))
    non_lora = {k: v.numpy() for k, v in sd.items() if k.startswith(("base_model.model.visual.",
                                                                      "base_model.model.model.embed_tokens.",
                                                                      "base_model.model.rm_head.",
                                                                      "base_model.model.lm_head."))}
    save_safetensors(adapter / "checkpoint-7" / "non_lora_state_dict.safetensors", non_lora)
    return dict(root=root, full=full, adapter=adapter, reward=reward, lora=lora, rm_head=rm_head, tok=tok,
                sd=sd, written=written)


def _reference_inputs(torch, tok, videos_u8: np.ndarray, fps: float):
    """VideoAlign's prepare_batch on in-memory uint8 clips (B, T, H, W, 3)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    frames = []
    for clip in videos_u8:
        x = torch.from_numpy(clip).permute(0, 3, 1, 2)  # TCHW uint8, as read_video / decord give it
        n = 4  # smart_nframes: 17 / 8 * 2 = 4.25 -> clamp [4, 16] -> round to even
        idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
        h, w = smart_resize(x.shape[2], x.shape[3], factor=28, min_pixels=128 * 28 * 28, max_pixels=200704)
        frames.append(TF.resize(x[idx], [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True).float())
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    chats = [[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(p)}]}]
             for p in PROMPTS]
    text = proc.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    batch = proc(text=text, videos=frames, padding=True, return_tensors="pt",
                 videos_kwargs={"do_rescale": True, "cap_pixels_per_frame": False})
    return batch, idx.tolist(), text


def _reference_forward(torch, world, batch):
    """Qwen2VLRewardModelBT.forward with the LoRA unmerged (PEFT's runtime), use_norm applied."""
    model, tok = world["reward"], world["tok"]
    scaling = ALPHA / RANK
    hooks = [mod.register_forward_hook(lambda m, inp, out, a=a, b=b: out + scaling * (inp[0] @ a.T) @ b.T)
             for mod, a, b in world["lora"].values()]
    try:
        with torch.no_grad():
            ids = batch["input_ids"]
            embeds = model.model.language_model.embed_tokens(ids)
            video = model.model.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
            mask = (ids == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, video)
            hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                position_ids=None).last_hidden_state
            logits = hidden @ world["rm_head"].T  # rm_head: Linear(hidden, 1, bias=False)
            special = torch.zeros_like(ids, dtype=torch.bool)
            for t in tok.convert_tokens_to_ids(REWARD_TOKENS):
                special |= ids == t
            raw = logits[special].view(ids.shape[0], 3, -1).view(ids.shape[0], -1).numpy()
    finally:
        for h in hooks:
            h.remove()
    mean = np.array([MEAN[k] for k in ("VQ", "MQ", "TA")])
    std = np.array([STD[k] for k in ("VQ", "MQ", "TA")])
    return raw, (raw - mean) / std


@pytest.fixture(scope="module")
def clips():
    """Two smooth-ish uint8 clips (B, T, H, W, 3) with noise, and the same as floats in [0, 1]."""
    rng = np.random.default_rng(0)
    t, h, w = CLIPS["num_frames"], CLIPS["height"], CLIPS["width"]
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    base = np.stack([yy, xx, 0.5 * (yy + xx)], -1)
    frames = [base[None] * (0.6 + 0.4 * np.sin(np.arange(t) / 3 + k))[:, None, None, None] for k in range(2)]
    u8 = np.clip(np.stack(frames) * 255 + rng.normal(0, 20, size=(2, t, h, w, 3)), 0, 255).round().astype(np.uint8)
    return u8, u8.astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def reference(torch, world, clips):
    batch, idx, text = _reference_inputs(torch, world["tok"], clips[0], CLIPS["fps"])
    raw, normed = _reference_forward(torch, world, batch)
    return dict(batch=batch, idx=idx, text=text, raw=raw, normed=normed)


@pytest.fixture(scope="module")
def scorer(world):
    return VideoAlignScorer.from_folder(world["full"])


@pytest.fixture(scope="module")
def batch(scorer):
    return scorer.tokenize(PROMPTS, **CLIPS)


def test_template_is_videoalign_s():
    """The detailed_special template, byte for byte (sha256 of VideoAlign's prompt_template.py
    DETAILED_PROMPT_WITH_SPECIAL_TOKEN, KwaiVGI/VideoAlign at 219ab9d)."""
    text = "\n".join(va._TEMPLATE_LINES)
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
    assert build_prompt("a {b} c").count("Textual prompt - a {b} c\n") == 1
    assert build_chat_text("x", 2).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                              "<|im_start|>user\n<|vision_start|><|video_pad|><|video_pad|>"
                                              "<|vision_end|>\nYou are tasked")
    assert build_chat_text("x", 2).endswith("<|TA_reward|>\nEND\n<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.torch
def test_frame_sampling_and_size(torch):
    # the paper's Wan clips: 53 frames at 16 fps -> 6 frames; at 25 fps (the mp4 the ViPO script writes) -> 4
    assert sample_frame_indices(53, 16) == (0, 10, 21, 31, 42, 52)
    assert sample_frame_indices(53, 25) == (0, 17, 35, 52)
    assert sample_frame_indices(17, 8.0) == (0, 5, 11, 16)
    assert sample_frame_indices(100, 30, fps=None, nframes=7) == sample_frame_indices(100, 30, fps=None, nframes=8)
    for total in range(2, 90, 3):
        for n in range(2, total + 1, 2):
            ref = tuple(torch.linspace(0, total - 1, n).round().long().tolist())
            assert sample_frame_indices(total, 1.0, fps=None, nframes=n) == ref, (total, n)
    with pytest.raises(DataError, match="frames"):
        sample_frame_indices(1, 16)
    assert smart_resize(240, 416, max_pixels=200704) == (252, 420)
    assert smart_resize(480, 832, max_pixels=200704) == (336, 588)
    assert smart_resize(60, 84, max_pixels=200704) == (280, 392)


def test_settings_from_model_config():
    s = VideoAlignSettings.from_dict(model_config_json(output_dim=3))
    assert (s.fps, s.num_frames, s.max_pixels, s.output_dim, s.lora_scaling) == (2.0, None, 200704, 3, 2.0)
    assert s.mean == (3.6757, 1.1646, 2.8105) and s.std == (2.2476, 1.3811, 2.5121)
    bad = model_config_json()
    bad["data_config"]["sample_type"] = "multi_pts"
    with pytest.raises(ConfigError, match="uniform"):
        VideoAlignSettings.from_dict(bad)


@pytest.mark.torch
def test_read_rewards_matches_special_token_pooling(torch):
    """output_dim 3: the reference's ``logits[special].view(B, 3, 3).diagonal``; output_dim 1: one
    value per token."""
    rng = np.random.default_rng(5)
    hidden = rng.normal(size=(2, 3, 8)).astype(np.float32)
    for out in (1, 3):
        w = rng.normal(size=(out, 8)).astype(np.float32)
        logits = torch.from_numpy(hidden) @ torch.from_numpy(w).T  # (B, 3, out)
        ref = logits.view(2, 3, -1)
        ref = (ref.diagonal(dim1=1, dim2=2) if out == 3 else ref).reshape(2, -1).numpy()
        ours = np.asarray(read_rewards(jnp.asarray(hidden), jnp.asarray(w.T)))
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.torch
def test_converter_keeps_the_state_dict(world):
    (dst,) = world["written"]
    assert dst.name == "model.safetensors"
    got = open_checkpoint(dst)
    assert set(got) == set(world["sd"])
    for k, v in world["sd"].items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.numpy(), err_msg=k)


@pytest.mark.torch
def test_tokenize_matches_processor(world, scorer, batch, reference):
    ref = reference["batch"]
    assert reference["text"][0] == build_chat_text(PROMPTS[0], 1)
    np.testing.assert_array_equal(batch["frame_indices"], np.array([reference["idx"]] * 2, np.int32))
    for i in range(2):
        n = int(ref["attention_mask"][i].sum())
        np.testing.assert_array_equal(batch["input_ids"][i, :n], ref["input_ids"][i, :n].numpy())
        assert batch["attention_mask"][i].sum() == n and batch["attention_mask"][i, :n].all()
        want = [int(np.nonzero(ref["input_ids"][i].numpy() == t)[0][0])
                for t in world["tok"].convert_tokens_to_ids(REWARD_TOKENS)]
        assert list(batch["reward_positions"][i]) == want
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["input_ids"].dtype == np.int32
    specs = scorer.input_specs(**CLIPS)
    assert {k: (v.shape, v.dtype) for k, v in specs.items()} == {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    with pytest.raises(DataError, match="max_length"):
        scorer.tokenize(PROMPTS, **CLIPS, max_length=100)
    with pytest.raises(DataError, match="VQ_reward"):
        scorer.tokenize(["say <|VQ_reward|>"], **CLIPS)


@pytest.mark.torch
def test_preprocessing_matches_processor(torch, clips, reference):
    """Our in-graph preprocessing of float frames vs the reference's uint8 pipeline on the same
    frames. With ``quantize`` (rounding to the reference's uint8 levels) the only differences are
    resize results within float error of a rounding boundary: at most one level (1/255 / std) on
    a tiny fraction of values. Without it the difference is the uint8 rounding itself, at most half
    a level."""
    ref = reference["batch"]["pixel_values_videos"].numpy().reshape(2, -1, 1176)
    level = 1.0 / 255.0 / min(QWEN2_VL_STD)
    prep = jax.jit(preprocess_videos, static_argnames=("size", "quantize"))
    for quantize in (True, False):
        ours, grid = prep(jnp.asarray(clips[1]), jnp.asarray(reference["idx"]), size=(280, 392), quantize=quantize)
        assert grid == tuple(reference["batch"]["video_grid_thw"][0].tolist())
        diff = np.abs(np.asarray(ours) - ref)
        ERRORS[f"pixels quantize={quantize} max"] = float(diff.max())
        ERRORS[f"pixels quantize={quantize} mean"] = float(diff.mean())
        if quantize:
            assert diff.max() <= level + 1e-5
            assert (diff > 1e-4).mean() < 1e-3
        else:
            assert diff.max() <= 0.5 * level + 1e-4


@pytest.mark.torch
def test_preprocessing_downscale(torch):
    """480x832 (Wan 480p) frames go down to 336x588: the antialiased bicubic of torchvision."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    from transformers import Qwen2VLVideoProcessor

    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, size=(1, 2, 480, 832, 3), dtype=np.uint8)
    x = torch.from_numpy(u8[0]).permute(0, 3, 1, 2)
    frames = TF.resize(x, [336, 588], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    ref = Qwen2VLVideoProcessor()(videos=[frames], do_rescale=True, cap_pixels_per_frame=False,
                                   return_tensors="pt")["pixel_values_videos"]
    ours, grid = preprocess_videos(jnp.asarray(u8, jnp.float32) / 255.0, jnp.arange(2), (336, 588), quantize=True)
    assert grid == (1, 24, 42)
    diff = np.abs(np.asarray(ours)[0] - ref.numpy())
    ERRORS["pixels downscale quantize=True max"] = float(diff.max())
    assert diff.max() <= 1.0 / 255.0 / min(QWEN2_VL_STD) + 1e-5
    assert (diff > 1e-4).mean() < 1e-3


@pytest.mark.torch
def test_model_parity(scorer, batch, reference):
    """The reward model on the reference's own pixel values: Qwen2-VL + merged LoRA + head."""
    ref = reference["batch"]
    grid = tuple(ref["video_grid_thw"][0].tolist())

    @jax.jit
    def raw(params, patches, ids, pos, mask):
        return nnx.merge(scorer.graphdef, params)(patches, grid, ids, pos, mask)

    patches = jnp.asarray(ref["pixel_values_videos"].numpy().reshape(2, -1, 1176))
    out = np.asarray(raw(scorer.params, patches, batch["input_ids"], batch["reward_positions"],
                         batch["attention_mask"]))
    ERRORS["raw scores"] = assert_close(out, reference["raw"], what="VideoAlign raw [VQ, MQ, TA]")


@pytest.mark.torch
def test_score_fn_end_to_end(scorer, batch, clips, reference):
    """From float frames in [0, 1] to normalised [VQ, MQ, TA], inside one jit."""
    out = np.asarray(scorer._jit(scorer.params, jnp.asarray(clips[1]), {k: jnp.asarray(v) for k, v in batch.items()}))
    assert out.shape == (2, 3) and out.dtype == np.float32
    # the few values one uint8 level apart (test_preprocessing_matches_processor) move the scores of
    # this random model by ~1e-5
    ERRORS["scores"] = assert_close(out, reference["normed"], rel=1e-3, what="VideoAlign scores")
    np.testing.assert_array_equal(scorer.score(clips[1], PROMPTS, CLIPS["fps"]), out)
    # float frames (quantize=False): half a uint8 level of difference on every pixel
    plain = jax.jit(make_score_fn(scorer.graphdef, scorer.settings, quantize=False))
    out = np.asarray(plain(scorer.params, jnp.asarray(clips[1]), {k: jnp.asarray(v) for k, v in batch.items()}))
    ERRORS["scores quantize=False"] = float(np.abs(out - reference["normed"]).max())
    assert ERRORS["scores quantize=False"] < 1e-2


@pytest.mark.torch
def test_adapter_layout_loads_the_same_model(world, scorer):
    model, settings, ckpt = load_videoalign(world["adapter"], base=world["root"] / "base")
    assert ckpt.name == "checkpoint-7" and settings.output_dim == 1
    got = dict(nnx.to_flat_state(nnx.state(model)))
    want = dict(nnx.to_flat_state(scorer.params))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k].get_value()), np.asarray(want[k].get_value()), rtol=1e-6,
                                   atol=1e-6, err_msg=str(k))


def _copy(world, tmp_path, which="full"):
    dst = tmp_path / which
    shutil.copytree(world[which], dst)
    return dst


@pytest.mark.torch
def test_loading_errors(world, tmp_path):
    folder = _copy(world, tmp_path)
    (folder / "model_config.json").unlink()
    with pytest.raises(CheckpointError, match="no model_config.json"):
        load_videoalign(folder)

    folder = _copy(world, tmp_path / "pickle")
    (folder / "checkpoint-7" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="python -m vipo_jax.convert videoalign"):
        load_videoalign(folder)
    (folder / "checkpoint-7" / "model.pth").unlink()
    with pytest.raises(CheckpointError, match="no VideoAlign weights"):
        load_videoalign(folder)

    folder = _copy(world, tmp_path / "nobase")
    shutil.rmtree(folder / "base")
    with pytest.raises(CheckpointError, match="no base model"):
        load_videoalign(folder)

    folder = _copy(world, tmp_path / "head")
    (folder / "model_config.json").write_text(json.dumps(model_config_json(output_dim=3)))
    with pytest.raises(CheckpointError, match="shape mismatch for 'rm_head.weight'"):
        load_videoalign(folder)

    adapter = _copy(world, tmp_path, "adapter")
    ckpt = adapter / "checkpoint-7"
    lora = dict(open_checkpoint(ckpt / "adapter_model.safetensors").items())
    shutil.copytree(world["root"] / "base", adapter / "base")
    # missing adapter: LoRA enabled in model_config.json, no LoRA tensors
    save_safetensors(ckpt / "adapter_model.safetensors", {})
    with pytest.raises(CheckpointError, match="missing adapter"):
        load_videoalign(adapter)
    # truncated adapter: one layer's LoRA missing
    save_safetensors(ckpt / "adapter_model.safetensors", {k: v for k, v in lora.items() if ".1.mlp.up_proj" not in k})
    with pytest.raises(CheckpointError, match="no LoRA for"):
        load_videoalign(adapter)
    # half a pair
    save_safetensors(ckpt / "adapter_model.safetensors",
                     {k: v for k, v in lora.items() if "0.self_attn.q_proj.lora_B" not in k})
    with pytest.raises(CheckpointError, match="only lora_A"):
        load_videoalign(adapter)
    # wrong shapes: a LoRA that does not fit its layer, and a rank other than the adapter config's
    bad = dict(lora)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad[key] = np.zeros((RANK, 5), np.float32)
    save_safetensors(ckpt / "adapter_model.safetensors", bad)
    with pytest.raises(CheckpointError, match="do not fit its weight"):
        load_videoalign(adapter)
    save_safetensors(ckpt / "adapter_model.safetensors", lora)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match="rank"):
        load_videoalign(adapter)
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    (ckpt / "non_lora_state_dict.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no rm_head.weight"):
        load_videoalign(adapter)


def test_abstract_paper_size_fits():
    """The released reward built abstractly in bfloat16 (how a planner sizes it next to Wan2.1-1.3B),
    and its score function traced at the paper's clips (8 x 53 x 240 x 416 at 16 fps: 6 frames)."""
    graphdef, params = va.abstract_videoalign()
    shapes = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
    nbytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in shapes.values())
    assert shapes["rm_head.kernel"].shape == (1536, 1)
    assert shapes["qwen.language_model.embed_tokens.embedding"].shape == (151660, 1536)
    assert 4.3e9 < nbytes < 4.5e9  # ~2.2e9 bf16 weights
    lay = va.video_layout(53, 240, 416, 16.0, va.RELEASE_SETTINGS, preset("qwen2-vl-2b").vision_config)
    assert lay.frame_indices == (0, 10, 21, 31, 42, 52) and lay.grid == (3, 18, 30) and lay.num_video_tokens == 405
    rows = {"input_ids": (1408,), "attention_mask": (1408,), "reward_positions": (3,), "frame_indices": (6,)}
    batch = {k: jax.ShapeDtypeStruct((8, *s), jnp.int32) for k, s in rows.items()}
    out = jax.eval_shape(make_score_fn(graphdef, va.RELEASE_SETTINGS), params,
                         jax.ShapeDtypeStruct((8, 53, 240, 416, 3), jnp.float32), batch)
    assert out.shape == (8, 3) and out.dtype == jnp.float32


@pytest.mark.torch
def test_bfloat16(world, clips, batch, reference):
    """The reference runs VideoAlign in bfloat16: weights and compute in bfloat16 (norms, softmax,
    RoPE and the head in float32) stay near the float32 scores."""
    bf = VideoAlignScorer.from_folder(world["full"], param_dtype="bfloat16", dtype="bfloat16", clips_per_call=1)
    assert jax.tree.leaves(bf.params)[0].dtype == jnp.bfloat16
    rows = {k: jnp.asarray(v) for k, v in batch.items()}
    out = np.asarray(jax.jit(bf.score_fn)(bf.params, jnp.asarray(clips[1]), rows))
    ERRORS["scores bfloat16"] = float(np.abs(out - reference["normed"]).max())
    assert out.dtype == np.float32 and ERRORS["scores bfloat16"] < 0.1  # ~1% per tower at this random init


def test_report_errors():
    if ERRORS:
        print("\nVideoAlign parity:", {k: f"{v:.2e}" for k, v in ERRORS.items()})



@pytest.mark.slow
def test_tiny_videoalign_trains_in_the_video_toy_world(world, tmp_path):
    """The registry entries wired into the step: a tiny random VideoAlign (the release's layout) as
    the video toy world's reward, VQ + MQ 1:1, two iterations of the full step (wiring, not learning)."""
    import json

    from configs import wan
    from vipo_jax.training.run import train

    c = wan.get_config("toy")
    c.rewards.names, c.rewards.coefs = "videoalign_vq,videoalign_mq", "1.0,1.0"
    c.rewards.videoalign = str(world["full"])
    c.sampling.prompts_per_iter, c.sampling.group_size = 1, 2
    c.train.iterations = 2
    c.log.eval_every, c.log.ckpt_every, c.log.tensorboard, c.log.phase_times = 0, 0, False, False
    train(c, tmp_path / "run", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert np.isfinite(r["reward/videoalign_vq"]) and np.isfinite(r["reward/videoalign_mq"])
        assert r["ratio_dev_first_update"] == 0.0 and r["updates_skipped"] == 0.0


def test_missing_videoalign_says_what_to_download():
    from configs import wan
    from vipo_jax.worlds import check_world_config

    c = wan.get_config("toy")
    c.rewards.names, c.rewards.coefs = "videoalign_vq", "1.0"
    with pytest.raises(CheckpointError, match="huggingface-cli download KlingTeam/VideoReward"):
        check_world_config(c, files=True)
