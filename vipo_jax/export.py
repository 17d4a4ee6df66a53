"""Command line: merge a run's trained policy and export it as one plain model.

    python -m vipo_jax.export --workdir=runs/toy_lora --out=runs/toy_lora_merged [--step=40] [--use_ema]
        [--format=native|diffusers|bfl] [--dtype=float32|bfloat16|float16]

Reads the run's ``config.json`` (model, LoRA settings) and checkpoint (latest, or ``--step``); folds
LoRA adapters into the base weights (or takes the full fine-tuned weights), or with ``--use_ema``
their EMA, and writes ``OUT/export.json`` (format, dtype, step, LoRA, EMA) and the model:

* ``--format=native`` (default; float32 unless ``--dtype``): ``OUT/transformer`` in our layout
  (``config.json`` + ``model.safetensors``). For the toy worlds ``OUT`` is a complete toy-assets
  folder: ``--config.model.path=OUT`` trains or evaluates from the exported policy.
* ``--format=diffusers`` (bfloat16 unless ``--dtype``, as FLUX.1 / Wan2.1 are released):
  ``OUT/transformer`` is a diffusers folder for ``FluxTransformer2DModel`` /
  ``WanTransformer3DModel.from_pretrained(OUT, subfolder="transformer")``.
* ``--format=bfl`` (FLUX only; bfloat16 unless ``--dtype``): ``OUT/flux1-<variant>-vipo.safetensors``,
  the Black Forest Labs single file (ComfyUI, the BFL code).

Any of them loads back with ``vipo_jax.evaluation.export.load_exported(OUT)``. ``--model_path``
points at the base model when it moved since training. Errors (a bad flag, a missing run, a layout
the model has no form in, an unwritable ``--out``) print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging

from vipo_jax.errors import VipoError
from vipo_jax.utils.cli import fail, flags_parser

_WORKDIR = flags.DEFINE_string("workdir", None, "the run's workdir (config.json, checkpoints/)")
_OUT = flags.DEFINE_string("out", None, "output folder")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "export the EMA weights (runs with train.ema_decay > 0)")
_MODEL_PATH = flags.DEFINE_string("model_path", "", "the base model folder, if not the run's model.path")
_FORMAT = flags.DEFINE_string("format", "native", "native | diffusers | bfl (FLUX only)")
_DTYPE = flags.DEFINE_string("dtype", None, "float32 | bfloat16 | float16 (default: float32 for native, "
                             "bfloat16 for diffusers and bfl)")


def main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value or not _OUT.value:
        fail("--workdir and --out are required, e.g. --workdir=runs/toy_lora --out=runs/merged")
    logging.set_verbosity(logging.WARNING)
    from vipo_jax.evaluation.export import export_policy

    try:
        rec = export_policy(_WORKDIR.value, _OUT.value, step=_STEP.value, use_ema=_USE_EMA.value,
                            model_path=_MODEL_PATH.value or None, fmt=_FORMAT.value, dtype=_DTYPE.value)
    except (VipoError, OSError) as e:
        fail(e)
    what = f"LoRA rank {rec['lora']['rank']} merged" if rec["lora"] else "full fine-tune"
    print(f"exported {rec['weights']} of {rec['workdir']} step {rec['step']} ({what}) as {rec['format']} "
          f"{rec['dtype']} to {rec['transformer']}")
    if rec["format"] == "native" and rec["world"] == "toy":
        print(f"use it with --config.model.path={_OUT.value}")
    elif rec["format"] == "diffusers":
        print(f"load it with {rec['class_name']}.from_pretrained({_OUT.value!r}, subfolder='transformer')")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser())
