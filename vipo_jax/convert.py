"""Turn PyTorch pickled checkpoints into safetensors this package loads without torch.

    python -m vipo_jax.convert hps --src HPS_v2.1_compressed.pt --dst hps_v21.safetensors

reads the open_clip state dict (``torch.load(weights_only=True)``; a ``{"state_dict": ...}``
wrapper and DistributedDataParallel ``module.`` prefixes are undone), checks every key and shape
against the model config (open_clip ViT-H-14 unless ``--model`` / ``--config`` says otherwise),
and writes the tensors unchanged (open_clip key names, original dtypes) plus our CLIP config as
``<dst stem>.json``. ``vipo_jax.models.clip.load_clip(dst)`` then loads it. torch is needed by
this command only.

    python -m vipo_jax.convert image-reward ImageReward.pt OUT_DIR

does the same for THUDM/ImageReward (``vipo_jax.models.blip.convert_image_reward_checkpoint``):
``OUT_DIR/model.safetensors`` + ``OUT_DIR/config.json``, loaded by
``vipo_jax.rewards.image_reward.ImageRewardScorer.from_folder``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError, VipoError


def _torch():
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            "reading a PyTorch .pt checkpoint needs torch, which is not installed: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu"
        ) from e
    return torch


def _to_numpy(torch, t) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def load_torch_state_dict(src: str | Path) -> dict[str, np.ndarray]:
    """A torch pickle -> ``{name: numpy array}``, safely (``weights_only=True``)."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    torch = _torch()
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many exception types for a bad file
        raise CheckpointError(
            f"{src} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:300]}). "
            "Only plain tensor checkpoints load with weights_only=True."
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{src} does not hold a state dict (got {type(obj).__name__})")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{src}: entry {k!r} is a {type(v).__name__}, not a tensor: "
                                  "not a model state dict")
        out[k[len("module."):] if str(k).startswith("module.") else str(k)] = _to_numpy(torch, v)
    return out


def _open_clip_model_cfg(model: str | None, config: str | Path | Mapping | None) -> dict[str, Any]:
    from vipo_jax.models.clip.config import OPEN_CLIP_CONFIGS

    if config is not None:
        if isinstance(config, Mapping):
            return dict(config)
        try:
            return json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"unreadable open_clip model config {config}: {e}") from e
    model = model or "ViT-H-14"
    if model not in OPEN_CLIP_CONFIGS:
        raise CheckpointError(f"unknown open_clip model {model!r}: known {sorted(OPEN_CLIP_CONFIGS)}; "
                              "pass --config with the model's open_clip json")
    return OPEN_CLIP_CONFIGS[model]


def convert_open_clip_checkpoint(src: str | Path, dst: str | Path, *, model: str | None = None,
                                 config: str | Path | Mapping | None = None) -> Path:
    """Convert an open_clip ``.pt`` (e.g. HPS_v2.1_compressed.pt) to ``dst`` (.safetensors) plus
    ``dst.with_suffix(".json")`` (our CLIPConfig). ``model``: a name in
    ``vipo_jax.models.clip.OPEN_CLIP_CONFIGS``; ``config``: an open_clip model config (dict or
    json path). Returns the path of the written config."""

    from vipo_jax.models.clip import CLIPModel, config_from_open_clip, convert_open_clip
    from vipo_jax.weights.loading import abstract_model, abstract_params
    from vipo_jax.weights.safetensors_io import save_safetensors

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"--dst must end in .safetensors, got {dst}")
    cfg = config_from_open_clip(_open_clip_model_cfg(model, config))
    tensors = load_torch_state_dict(src)
    # Validate before writing: every key used, every shape right.
    params = convert_open_clip(tensors, cfg, where=str(src))
    want = abstract_params(abstract_model(CLIPModel, cfg))
    for name, spec in want.items():
        if tuple(np.shape(params[name])) != tuple(spec.shape):
            raise CheckpointError(f"shape mismatch for {name} from {src}: checkpoint has "
                                  f"{tuple(np.shape(params[name]))}, config expects {tuple(spec.shape)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(dst, tensors, metadata={"format": "open_clip", "source": src.name})
    cfg_path = dst.with_suffix(".json")
    cfg_path.write_text(json.dumps({**cfg.to_dict(), "layout": "open_clip"}, indent=2) + "\n")
    return cfg_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vipo_jax.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    hps = sub.add_parser("hps", help="open_clip checkpoint (HPSv2 / HPSv2.1 .pt) -> safetensors")
    hps.add_argument("--src", required=True, help="the .pt file, e.g. HPS_v2.1_compressed.pt")
    hps.add_argument("--dst", required=True, help="output .safetensors (config goes to <stem>.json)")
    hps.add_argument("--model", default=None, help="open_clip model name (default ViT-H-14)")
    hps.add_argument("--config", default=None, help="open_clip model config json (overrides --model)")
    ir = sub.add_parser("image-reward", help="ImageReward.pt -> OUT_DIR/model.safetensors + config.json")
    ir.add_argument("src", help="the .pt file, e.g. ImageReward.pt")
    ir.add_argument("out_dir", help="output folder")
    ir.add_argument("--config", default=None, help="our ImageReward config.json (default: the v1.0 architecture)")
    ir.add_argument("--med-config", default=None, help="BLIP med_config.json for the text encoder")
    args = parser.parse_args(argv)
    try:
        if args.command == "image-reward":
            from vipo_jax.models.blip.convert import convert_image_reward_checkpoint

            out = convert_image_reward_checkpoint(args.src, args.out_dir, config=args.config,
                                                  med_config=args.med_config)
            print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
            return 0
        cfg_path = convert_open_clip_checkpoint(args.src, args.dst, model=args.model, config=args.config)
    except VipoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst} and {cfg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
