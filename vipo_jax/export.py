"""Command line: merge a run's trained policy and export it as one plain model.

    python -m vipo_jax.export --workdir=runs/toy_lora --out=runs/toy_lora_merged [--step=40] [--use_ema]

Reads the run's ``config.json`` (model, LoRA settings) and checkpoint (latest, or ``--step``); folds
LoRA adapters into the base weights (or takes the full fine-tuned weights), or with ``--use_ema``
their EMA, and writes ``OUT/transformer`` in the native layout (``config.json`` +
``model.safetensors``) and ``OUT/export.json``. For the toy worlds ``OUT`` is a complete toy-assets
folder: ``--config.model.path=OUT`` trains or evaluates from the exported policy. Elsewhere load it
with ``vipo_jax.evaluation.export.load_exported(OUT)``. ``--model_path`` points at the base model when
it moved since training.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging

from vipo_jax.errors import VipoError

_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (config.json, checkpoints/)")
_OUT = flags.DEFINE_string("out", None, "output folder")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "export the EMA weights (runs with train.ema_decay > 0)")
_MODEL_PATH = flags.DEFINE_string("model_path", "", "the base model folder, if not the run's model.path")


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required, e.g. --workdir=runs/toy_lora --out=runs/merged")
    logging.set_verbosity(logging.WARNING)
    from vipo_jax.evaluation.export import export_policy

    try:
        rec = export_policy(_WORKDIR.value, _OUT.value, step=_STEP.value, use_ema=_USE_EMA.value,
                            model_path=_MODEL_PATH.value or None)
    except VipoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    what = f"LoRA rank {rec['lora']['rank']} merged" if rec["lora"] else "full fine-tune"
    print(f"exported {rec['weights']} of {rec['workdir']} step {rec['step']} ({what}) to {rec['transformer']}")
    if rec["world"] == "toy":
        print(f"use it with --config.model.path={_OUT.value}")


if __name__ == "__main__":
    app.run(main)
