"""Every PSM backbone and every map control runs the full toy step for two iterations (the wiring;
the backbones' parity is in their own tests), on-policy; a missing backbone folder is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import flux
from vipo_jax.errors import CheckpointError

pytestmark = pytest.mark.slow


def small(**over):
    c = flux.get_config("toy")
    c.train.iterations = 2
    c.sampling.prompts_per_iter, c.sampling.group_size, c.sampling.num_steps = 2, 2, 3
    c.log.eval_every, c.log.ckpt_every, c.log.tensorboard, c.log.phase_times = 0, 0, False, False
    for k, v in over.items():
        section, name = k.split(".")
        c[section][name] = v
    return c


def _run(c, workdir: Path) -> list[dict]:
    from vipo_jax.training.run import train

    train(c, workdir, progress=False)
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _check(recs: list[dict]) -> None:
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert r["ratio_dev_first_update"] == 0.0 and r["updates_skipped"] == 0.0
        assert np.isfinite(r["loss"]) and 0.0 <= r["map/mean"] <= 1.0


@pytest.mark.parametrize("control", ["inverted", "mean_map", "shuffled"])
def test_each_control_runs(control, tmp_path):
    _check(_run(small(**{"psm.control": control}), tmp_path / control))


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_model_free_backbones_run(kind, tmp_path):
    _check(_run(small(**{"psm.backbone_kind": kind}), tmp_path / kind))


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["resnet", "sam"])
def test_resnet_and_sam_backbones_run(kind, torch, tmp_path):
    """A tiny random transformers ResNet / SamModel folder (the real layout) as the toy world's backbone."""
    import transformers as tf

    folder = tmp_path / kind
    torch.manual_seed(0)
    if kind == "resnet":
        tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                       layer_type="basic")).save_pretrained(folder)
        over = {"psm.backbone_layer": "stage2"}  # 64 px -> 8x8 at stage2
    else:
        vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                      patch_size=8, mlp_dim=48, global_attn_indexes=[1], window_size=4)
        tf.SamModel(tf.SamConfig(vision_config=vision)).save_pretrained(folder)
        over = {}
    _check(_run(small(**{"psm.backbone_kind": kind, "psm.backbone": str(folder), **over}), tmp_path / "run"))


def test_missing_backbone_folder_says_what_to_download():
    from vipo_jax.worlds import check_world_config

    for kind, hint in (("resnet", "microsoft/resnet-50"), ("sam", "facebook/sam-vit-base")):
        with pytest.raises(CheckpointError, match=hint):
            check_world_config(small(**{"psm.backbone_kind": kind}), files=True)


def test_maps_cli_on_rendered_digits(tmp_path):
    """`python -m vipo_jax.maps` on a folder of rendered toy digits: a map per image, the subject
    (the digit) weighted above the background by the toy DINOv2 with the border sign rule."""
    import subprocess
    import sys

    from PIL import Image

    from vipo_jax.toy import digits

    images8, targets = digits.load_split("eval")
    masks = []
    (tmp_path / "in").mkdir()
    for k in range(4):
        img = digits.render(images8[k], "red", "blue")
        masks.append(digits.render(images8[k], "white", "black")[..., 0] > 0.5)
        Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp_path / "in" / f"d{k}.png")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "vipo_jax.maps", f"--images={tmp_path / 'in'}",
                          f"--out={tmp_path / 'out'}", "--grid=16"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "maps.json").read_text())["maps"]
    assert sorted(stats) == ["d0", "d1", "d2", "d3"] and (tmp_path / "out" / "maps.png").is_file()
    for k, mask in enumerate(masks):
        m = np.load(tmp_path / "out" / f"d{k}.map.npy")
        assert m.shape == (16, 16)
        cells = mask.reshape(16, 4, 16, 4).mean((1, 3)) > 0.5  # the digit's cells on the map grid
        assert m[cells].mean() > m[~cells].mean() + 0.2, (k, m[cells].mean(), m[~cells].mean())
    bad = subprocess.run([sys.executable, "-m", "vipo_jax.maps", f"--images={tmp_path / 'nope'}",
                          f"--out={tmp_path / 'o2'}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
