"""``python -m vipo_jax.plan --config=configs/flux.py --mesh=fsdp=8 --device=h100``

Compiles the full-size train step of a config for a mesh on this machine's CPU (no weights, no
accelerator: ``--devices=N`` simulates N devices) and prints per-device memory (parameters,
optimizer, frozen models, XLA's arguments and temporaries), FLOPs per iteration and the iteration
time predicted at ``--mfu``. ``--out`` appends the table to a Markdown file.
"""

from __future__ import annotations

import os
import sys


def _early_devices(argv: list[str]) -> None:
    """XLA reads the simulated device count at start-up: set it before jax is imported. A value that
    is not a count >= 0 is a one-line error (exit 2)."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            a = f"--devices={argv[i + 1]}"
        if a.startswith("--devices="):
            text = a.split("=", 1)[1]
            if not text.strip().isdigit():
                print(f"error: --devices={text!r} must be a whole number of simulated CPU devices >= 0 (0: no "
                      "simulation), e.g. --devices=8", file=sys.stderr)
                sys.exit(2)
            n = int(text)
            if n == 0:
                continue
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
            os.environ.setdefault("JAX_PLATFORMS", "cpu")


_early_devices(sys.argv)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg] (the full-size recipe)",
                                          lock_config=False)
_MESH = flags.DEFINE_string("mesh", "", "mesh sizes, e.g. 'fsdp=8' or 'data=2,fsdp=4' (default: the config's)")
_DEVICE = flags.DEFINE_string("device", "h100", "accelerator to predict for: h100 h200 a100 b200 v4 v5e v5p v6e")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOP utilisation the time prediction assumes")
flags.DEFINE_integer("devices", 0, "simulated CPU devices (read before jax starts)")
_OUT = flags.DEFINE_string("out", "", "append the table to this Markdown file")
_NO_CHECK = flags.DEFINE_bool("no_flops_check", False, "skip the XLA cross-check of the FLOP formula")


def parse_mesh(text: str) -> dict[str, int]:
    from vipo_jax.errors import ConfigError

    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh={text!r}: expected axis=size pairs like 'data=2,fsdp=4'")
        out[k.strip()] = int(v)
    return out


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/flux.py")
    from vipo_jax.errors import VipoError
    from vipo_jax.plan.planner import flops_check_line, phases_line, plan, table
    from vipo_jax.utils.cli import fail
    from vipo_jax.utils.devices import device

    c = _CONFIG.value
    try:
        if _MESH.value:
            mesh = parse_mesh(_MESH.value)
            c.mesh = {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **mesh}
        r = plan(c, device(_DEVICE.value), mfu=_MFU.value, check_flops=not _NO_CHECK.value)
    except (VipoError, OSError) as e:
        fail(e)
    text = table([r])
    print(text)
    print(phases_line(r))
    print(f"compiled in {r['compile_s']:.0f} s; {flops_check_line(r)}")
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(text.split("\n", 2)[2] + "\n")


if __name__ == "__main__":
    from vipo_jax.utils.cli import flags_parser

    app.run(main, flags_parser=flags_parser(_CONFIG))
