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

    python -m vipo_jax.convert videoalign /data/VideoReward

turns VideoAlign's pickled ``checkpoint-N/model.pth`` into ``model.safetensors`` beside it
(docs/VIDEOALIGN.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from vipo_jax.errors import VipoError
from vipo_jax.models.blip.convert import convert_image_reward_checkpoint
from vipo_jax.models.clip.convert import convert_open_clip_checkpoint
from vipo_jax.rewards.videoalign import convert_videoalign_checkpoint


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
    va = sub.add_parser("videoalign", help="VideoAlign's checkpoint-N/model.pth -> model.safetensors beside it")
    va.add_argument("folder", help="the KlingTeam/VideoReward folder (model_config.json, checkpoint-N/)")
    args = parser.parse_args(argv)
    try:
        if args.command == "videoalign":
            for path in convert_videoalign_checkpoint(args.folder):
                print(f"wrote {path}")
            return 0
        if args.command == "image-reward":
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
