"""The switches of ``configs/flux.py:official`` / ``configs/wan.py:official``, each against a formula
written from the official ViPO code (fastvideo/train_vipo_flux.py, train_vipo_wan_fsdp.py), and the
toy world trained with all of them at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import flux as flux_configs
from configs import wan as wan_configs
from tests.test_psm_variants import _check, _run, small
from tests.utils import assert_close
from vipo_jax import rl
from vipo_jax.backbones.dinov2 import official_pixels, official_rescale
from vipo_jax.errors import ConfigError
from vipo_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.flux.velocity import flux_velocity
from vipo_jax.models.wan.velocity import wan_velocity
from vipo_jax.training.checks import check_config
from vipo_jax.training.step_config import StepConfig

FLUX_TINY = dict(patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6), in_channels=16,
                 guidance_embeds=True)


def test_presets_differ_from_the_recipe_only_in_the_official_switches():
    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
        return out

    switches = {"psm.sign_rule": "sklearn_v", "model.timestep_rounding": "floor", "psm.backbone_input": "crop_uint8",
                "psm.rescale_rule": "if_negative", "sampling.stochastic_last_step": True}
    for mod, arg, extra in [(flux_configs, "", {"train.logprob_reduction": "sample_mean"}),
                            (wan_configs, "", {"rewards.videoalign_fps": 25.0})]:
        base, official = flat(mod.get_config(arg)), flat(mod.get_config("official"))
        changed = {k: official[k] for k in official if official[k] != base[k]}
        assert changed == {**switches, **extra}, mod.__name__
    toy, toy_official = flat(flux_configs.get_config("toy")), flat(flux_configs.get_config("toy_official"))
    assert {k for k in toy if toy[k] != toy_official[k]} == set(switches) | {"train.logprob_reduction"}


def test_flux_timestep_floor_feeds_the_dit_int_1000_sigma():
    """int(sigma * 1000) / 1000 is what the official FLUX script passes as ``timestep`` (to within the
    one float32 ulp by which XLA's vectorised division may differ from IEEE division)."""
    seen = []

    def model(tokens, t5, pooled, sigma, img_ids, txt_ids, guidance=None):  # records the DiT's timestep
        seen.append(np.asarray(sigma))
        return tokens

    x, t5, pooled = jnp.zeros((2, 4, 6, 4)), jnp.zeros((2, 5, 24)), jnp.zeros((2, 20))
    for sigma in (0.7371, 0.0999, 0.5, 1.0):
        flux_velocity(model, x, jnp.float32(sigma), t5, pooled, None, timestep_floor=True)
        want = np.float32(np.floor(np.float32(sigma) * np.float64(1000)) / 1000)
        assert np.all(np.abs(seen[-1] - want) <= np.spacing(want)), (sigma, seen[-1])
    flux_velocity(model, x, jnp.float32(0.7371), t5, pooled, None)
    assert_close(seen[-1], [0.7371, 0.7371], rel=1e-7)
    # and the real DiT: a different output from the exact timestep's
    model = FluxTransformer(FluxConfig(**FLUX_TINY), rngs=nnx.Rngs(0))
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 4, 6, 4))
    t5, pooled = jax.random.normal(k[1], (2, 5, 24)), jax.random.normal(k[2], (2, 20))
    g = jnp.full((2,), 3.5)
    exact = flux_velocity(model, x, jnp.float32(0.7371), t5, pooled, g)
    floored = flux_velocity(model, x, jnp.float32(0.7371), t5, pooled, g, timestep_floor=True)
    assert float(jnp.max(jnp.abs(exact - floored))) > 1e-3


def test_wan_timestep_floor_feeds_the_dit_int_1000_sigma():
    seen = []

    def model(x, t, text):  # records the timestep the DiT is given
        seen.append(np.asarray(t))
        return x

    x, text = jnp.zeros((2, 1, 2, 2, 4)), jnp.zeros((2, 3, 8))
    wan_velocity(model, x, jnp.float32(0.7371), text, timestep_floor=True)
    wan_velocity(model, x, jnp.float32(0.7371), text)
    np.testing.assert_array_equal(seen[0], [737.0, 737.0])
    assert_close(seen[1], [737.1, 737.1], rel=1e-6)


def _official_dinov2_input(x: np.ndarray) -> np.ndarray:
    """The official compute_dinov2_feature_map's input, written from its source with numpy + PIL +
    transformers' DINOv2 image processor: ``if x.min() < 0: x = (x + 1) / 2``, clamp to [0, 1],
    ``(x * 255).astype(uint8)``, the processor resizing to the image's own size without a centre
    crop; the patch convolution then reads the largest multiple of the patch."""
    from PIL import Image
    from transformers import BitImageProcessor

    proc = BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=3, do_center_crop=True,
                             crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                             do_convert_rgb=True)
    out = []
    for img in x:
        if img.min() < 0:
            img = (img + 1.0) / 2.0
        img = np.clip(img, 0, 1).astype(np.float32)
        pil = Image.fromarray((img * 255).astype(np.uint8))
        pv = proc(images=pil, return_tensors="np", size={"height": pil.size[1], "width": pil.size[0]},
                  do_center_crop=False, do_resize=True)["pixel_values"][0]
        out.append(np.transpose(pv, (1, 2, 0)))
    return np.stack(out)


def test_dinov2_official_input_matches_the_official_preprocessing():
    rng = np.random.default_rng(0)
    patch = 14
    decoded = rng.uniform(-1.1, 1.1, (3, 33, 45, 3)).astype(np.float32)  # the VAE's output x
    decoded[1] = np.abs(decoded[1])  # min >= 0: the official code reads it as it is, not as (x + 1) / 2
    images01 = np.clip((decoded + 1) / 2, 0, 1)  # what our decoder hands the backbone
    ours = np.asarray(official_pixels(official_rescale(jnp.asarray(images01)), patch))
    want = _official_dinov2_input(decoded)
    assert ours.shape == (3, 28, 42, 3)  # 33 x 45 -> the 2 x 3 patches the convolution reads
    # level boundaries: (x+1)/2 computed from our [0, 1] image can cross an integer level at 255 x
    # one float32 ulp; allow one level (1/255/std ~ 0.0175) at a vanishing share of the pixels
    err = np.abs(ours - want[:, :28, :42])
    assert np.mean(err > 1e-5) < 1e-3 and err.max() < 1.01 / 255 / min(IMAGENET_STD)


def test_stochastic_last_step_changes_only_the_unused_last_state():
    """The official scripts sample the last step with the SDE too: the decoded output (the last
    step's clean prediction) and every trained log-prob stay the same."""
    sigmas = rl.sigma_schedule(4, 3.0)

    def vel(x, s, cond):
        return 0.3 * x + s[:, None, None]

    x = jax.random.normal(jax.random.key(1), (2, 3, 3))
    a = rl.rollout(vel, x, None, sigmas, 0.7, jax.random.key(2))
    b = rl.rollout(vel, x, None, sigmas, 0.7, jax.random.key(2), stochastic_last=True)
    np.testing.assert_array_equal(a["x0"], b["x0"])
    np.testing.assert_array_equal(a["latents"][:-1], b["latents"][:-1])
    np.testing.assert_array_equal(a["log_probs"][:-1], b["log_probs"][:-1])
    assert float(jnp.max(jnp.abs(a["latents"][-1] - b["latents"][-1]))) > 0
    assert np.all(np.asarray(a["log_probs"][-1]) == 0) and np.all(np.isfinite(b["log_probs"][-1]))
    assert float(jnp.max(jnp.abs(b["log_probs"][-1]))) > 0


def test_reward_and_advantage_matches_the_official_wan_hps_formula():
    """train_vipo_wan_fsdp.py, HPS branch: reward r * M per position, the group's mean and (unbiased)
    std over all samples and positions, the normalised value times M again."""
    rng = np.random.default_rng(3)
    G, B = 4, 8
    r = rng.normal(size=B).astype(np.float32)
    m = rng.uniform(size=(B, 2, 3, 5)).astype(np.float32)
    ours = np.asarray(rl.pixel_rewards_to_advantages(jnp.asarray(r), jnp.asarray(m), G, stats="group")) * m
    want = np.empty_like(m)
    for g in range(B // G):
        pix = r[g * G:(g + 1) * G, None, None, None] * m[g * G:(g + 1) * G]
        want[g * G:(g + 1) * G] = (pix - pix.mean()) / (pix.std(ddof=1) + 1e-8) * m[g * G:(g + 1) * G]
    assert_close(ours, want, rel=1e-5)


def test_official_sampling_refuses_the_window_and_ratio_norm():
    for over in ({"sde_window": 2}, {"ode_solver": "dpm2"}, {"ratio_norm": True}):
        with pytest.raises(ConfigError, match="stochastic_last_step"):
            StepConfig(num_steps=6, shift=3.0, eta=0.3, group_size=2, stochastic_last_step=True, **over)
    c = flux_configs.get_config("toy")
    c.model.timestep_rounding = "nearest"
    with pytest.raises(ConfigError, match="timestep_rounding"):
        check_config(c)


@pytest.mark.slow
def test_toy_world_trains_with_every_official_switch(tmp_path):
    c = small()
    flux_configs.official(c)
    _check(_run(c, tmp_path / "official"))
