"""Forward-pass benchmark of the ported models against their PyTorch references, in float32.

For each model (FLUX.1-dev DiT, FLUX VAE decode and encode, T5 encoder, CLIP text, CLIP vision,
DINOv2) this builds the reference at a random config with diffusers / transformers, saves it with
the library's own ``save_pretrained`` into a temporary folder, loads it with our loader, checks
float32 parity (max abs error, tolerance ``1e-4 x max(1, max|ref|)`` as in the tests), and times
both forward passes in the same process: ours jitted (after warm-up, ``block_until_ready``), the
reference eager under ``torch.no_grad()`` with ``torch.set_num_threads(<usable cores>)``. Reports
the median of ``--repeats`` runs as one Markdown table.

    python benchmarks/forward.py [--size tiny|small] [--repeats N] [--models flux,vae_decode,...]

``tiny`` are the tests' configs (compile-bound, timings mostly overhead); ``small`` are larger but
still CPU-friendly configs (FLUX width 256 with 2+4 blocks over 256 image tokens, VAE (32, 64, 64)
at 128 px, T5 d_model 256 x 4 layers over 64 tokens, CLIP-B/32-like towers with 4 layers, DINOv2-S
-like with 6 layers at 224 px). JAX runs on the CPU unless ``JAX_PLATFORMS`` says otherwise.
Exit status 1 if any parity check fails.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

# transformers / diffusers import torchvision, whose compiled fake-op registrations do not match the
# pinned CPU torch wheel; the reference models never use those ops (see tests/conftest.py).
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from vipo_jax.models.clip import from_pretrained as load_clip  # noqa: E402
from vipo_jax.models.dinov2 import from_pretrained as load_dinov2  # noqa: E402
from vipo_jax.models.flux import from_pretrained as load_flux_transformer  # noqa: E402
from vipo_jax.models.flux import latent_image_ids, pack_latents, text_ids  # noqa: E402
from vipo_jax.models.t5 import from_pretrained as load_t5_encoder  # noqa: E402
from vipo_jax.models.vae import from_pretrained as load_vae  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(threads: int) -> str:
    import diffusers
    import jaxlib
    import transformers

    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    load = f" (load average {os.getloadavg()[0]:.2f} before the run)" if hasattr(os, "getloadavg") else ""
    return (f"Machine: {cpu_model()}, {usable_cores()} usable cores (of {os.cpu_count()}){load}; "
            f"JAX {jax.__version__} (jaxlib {jaxlib.__version__}, backend {jax.default_backend()}: {devices}), "
            f"torch {torch.__version__} (CPU, {threads} threads), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


# ------------------------------------------------------------------------------------------------
# Cases: a reference forward and ours, on the same inputs, with outputs in our layout.


@dataclass
class Case:
    model: str
    config: str
    batch: int
    torch_fn: Callable[[], Any]  # reference forward (called under no_grad)
    torch_np: Callable[[Any], list[np.ndarray]]  # its outputs -> numpy, in our layout
    jax_fn: Callable[[], Any]  # our jitted forward, returns a pytree of arrays


def jitted(model: nnx.Module, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call(module, *args)`` jitted with the parameters as an argument (not baked-in constants)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, *args: call(nnx.merge(graphdef, s), *args))
    return lambda *args: fn(state, *args)


def perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Reference inits leave norm scales at 1 and shifts at 0: randomise them, so that a norm
    mapped to the wrong place shows in the parity check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                base = 1.0 if name.endswith((".weight", ".scale")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


# --- FLUX.1-dev DiT ------------------------------------------------------------------------------

FLUX = {
    # tests/test_flux_dit.py: 8x12 latent (4 channels) -> 24 image tokens, 5 text tokens.
    "tiny": (dict(patch_size=1, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=20, axes_dims_rope=(4, 6, 6), in_channels=16),
             dict(batch=2, lat_c=4, lat_h=8, lat_w=12, n_txt=5)),
    # width 256 (4 x 64), 2 double + 4 single blocks, 32x32 latent (16 channels) -> 256 image tokens.
    "small": (dict(patch_size=1, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                   joint_attention_dim=128, pooled_projection_dim=64, axes_dims_rope=(16, 24, 24), in_channels=64),
              dict(batch=2, lat_c=16, lat_h=32, lat_w=32, n_txt=32)),
}


def case_flux(size: str, tmp: Path) -> list[Case]:
    import diffusers

    cfg, shp = FLUX[size]
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**cfg, guidance_embeds=True).eval()
    perturb_norms(ref, 1)
    ref.save_pretrained(tmp / "flux", safe_serialization=True)
    ours = load_flux_transformer(tmp / "flux")

    b, n_txt = shp["batch"], shp["n_txt"]
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((b, shp["lat_c"], shp["lat_h"], shp["lat_w"])).astype(np.float32)
    x = dict(
        img=np.array(pack_latents(latents)),  # writable copies: torch.from_numpy shares them
        txt=rng.standard_normal((b, n_txt, cfg["joint_attention_dim"])).astype(np.float32),
        pooled=rng.standard_normal((b, cfg["pooled_projection_dim"])).astype(np.float32),
        timestep=np.linspace(0.3, 0.9, b).astype(np.float32),
        img_ids=np.array(latent_image_ids(shp["lat_h"], shp["lat_w"])),
        txt_ids=np.array(text_ids(n_txt)),
        guidance=np.full((b,), 3.5, np.float32),
    )
    tx = {k: torch.from_numpy(v) for k, v in x.items()}
    jx = {k: jnp.asarray(v) for k, v in x.items()}
    fwd = jitted(ours, lambda m, a: m(**a))

    def torch_fn():
        return ref(hidden_states=tx["img"], encoder_hidden_states=tx["txt"], pooled_projections=tx["pooled"],
                   timestep=tx["timestep"], img_ids=tx["img_ids"], txt_ids=tx["txt_ids"],
                   guidance=tx["guidance"], return_dict=False)[0]

    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_img = x["img"].shape[1]
    desc = (f"dev, width {width}, {cfg['num_layers']}+{cfg['num_single_layers']} blocks, "
            f"{n_img} img + {n_txt} txt tokens")
    return [Case("Flux DiT", desc, b, torch_fn, lambda o: [o.numpy()], lambda: fwd(jx))]


# --- FLUX VAE ------------------------------------------------------------------------------------

VAE = {
    # tests/test_flux_vae.py TINY: FLUX-like (16 latent channels, no quant convs, mid attention).
    "tiny": (dict(block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=4), dict(batch=2, h=32, w=48)),
    "small": (dict(block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=32),
              dict(batch=1, h=128, w=128)),
}


def case_vae(size: str, tmp: Path) -> list[Case]:
    import diffusers

    arch, shp = VAE[size]
    n = len(arch["block_out_channels"])
    cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
               up_block_types=["UpDecoderBlock2D"] * n, latent_channels=16, sample_size=shp["h"],
               scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
               mid_block_add_attention=True, **arch)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg).eval()
    perturb_norms(ref, 2)
    ref.save_pretrained(tmp / "vae", safe_serialization=True)
    ours = load_vae(tmp / "vae")

    b, h, w, f = shp["batch"], shp["h"], shp["w"], 2 ** (n - 1)
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    z = rng.standard_normal((b, h // f, w // f, 16)).astype(np.float32)
    t_img, t_z, j_img, j_z = nchw(img), nchw(z), jnp.asarray(img), jnp.asarray(z)
    decode = jitted(ours, lambda m, z: m.decode(z))
    encode = jitted(ours, lambda m, x: m.encode(x))

    def torch_encode():
        post = ref.encode(t_img).latent_dist
        return post.mean, post.logvar

    desc = f"channels {tuple(arch['block_out_channels'])}, {arch['layers_per_block']} res/block"
    return [
        Case("Flux VAE decode", f"{desc}, {h // f}x{w // f}x16 -> {h}x{w}", b,
             lambda: ref.decode(t_z).sample, lambda o: [nhwc(o)], lambda: decode(j_z)),
        Case("Flux VAE encode", f"{desc}, {h}x{w} -> {h // f}x{w // f}x16", b,
             torch_encode, lambda o: [nhwc(o[0]), nhwc(o[1])], lambda: encode(j_img)),
    ]


# --- T5 encoder ----------------------------------------------------------------------------------

T5 = {
    "tiny": (dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16), dict(batch=2, length=20)),
    "small": (dict(vocab_size=1024, d_model=256, d_kv=64, d_ff=640, num_layers=4, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128),
              dict(batch=2, length=64)),
}


def case_t5(size: str, tmp: Path) -> list[Case]:
    import transformers as tf

    arch, shp = T5[size]
    torch.manual_seed(0)
    ref = tf.T5EncoderModel(tf.T5Config(**arch, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    perturb_norms(ref, 3)
    ref.save_pretrained(tmp / "t5")
    ours = load_t5_encoder(tmp / "t5")

    b, n = shp["batch"], shp["length"]
    rng = np.random.default_rng(0)
    ids = rng.integers(2, arch["vocab_size"], size=(b, n)).astype(np.int64)
    mask = np.ones((b, n), np.int64)
    mask[-1, n * 2 // 3:] = 0  # one padded row
    ids[mask == 0] = 0
    t_ids, t_mask, j_ids, j_mask = torch.from_numpy(ids), torch.from_numpy(mask), jnp.asarray(ids), jnp.asarray(mask)
    fwd = jitted(ours, lambda m, i, k: m(i, k))
    desc = (f"v1.1 gated-gelu, d_model {arch['d_model']} x {arch['num_layers']} layers, "
            f"{arch['num_heads']} heads, {n} tokens")
    return [Case("T5 encoder", desc, b, lambda: ref(input_ids=t_ids, attention_mask=t_mask).last_hidden_state,
                 lambda o: [o.numpy()], lambda: fwd(j_ids, j_mask))]


# --- CLIP ----------------------------------------------------------------------------------------

CLIP_TEXT = {
    "tiny": (dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=16, bos_token_id=97, eos_token_id=98, pad_token_id=1),
             dict(batch=2, length=10)),
    # CLIP-B/32 text tower with 4 layers (vocabulary cut to keep the checkpoint small).
    "small": (dict(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                   num_attention_heads=8, max_position_embeddings=77, bos_token_id=4094, eos_token_id=4095,
                   pad_token_id=1), dict(batch=2, length=77)),
}
CLIP_VISION = {
    "tiny": (dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8), dict(batch=2)),
    # CLIP-B/32 vision tower with 4 layers.
    "small": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                   image_size=224, patch_size=32), dict(batch=2)),
}


def case_clip_text(size: str, tmp: Path) -> list[Case]:
    import transformers as tf

    arch, shp = CLIP_TEXT[size]
    torch.manual_seed(0)
    ref = tf.CLIPTextModel(tf.CLIPTextConfig(**arch)).eval()
    perturb_norms(ref, 4)
    ref.save_pretrained(tmp / "clip_text")
    ours = load_clip(tmp / "clip_text", component="text")

    b, n = shp["batch"], shp["length"]
    rng = np.random.default_rng(0)
    ids = rng.integers(2, arch["vocab_size"] - 3, size=(b, n)).astype(np.int64)
    lengths = np.linspace(n // 2, n, b).astype(int)  # first row padded, last row full
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = arch["bos_token_id"]
    ids[np.arange(b), lengths - 1] = arch["eos_token_id"]
    ids[mask == 0] = arch["pad_token_id"]
    t_ids, t_mask, j_ids, j_mask = torch.from_numpy(ids), torch.from_numpy(mask), jnp.asarray(ids), jnp.asarray(mask)
    fwd = jitted(ours, lambda m, i, k: m(i, k))

    def torch_fn():
        out = ref(input_ids=t_ids, attention_mask=t_mask)
        return out.last_hidden_state, out.pooler_output

    desc = (f"width {arch['hidden_size']} x {arch['num_hidden_layers']} layers, "
            f"{arch['num_attention_heads']} heads, {n} tokens")
    return [Case("CLIP text", desc, b, torch_fn, lambda o: [o[0].numpy(), o[1].numpy()],
                 lambda: fwd(j_ids, j_mask))]


def case_clip_vision(size: str, tmp: Path) -> list[Case]:
    import transformers as tf

    arch, shp = CLIP_VISION[size]
    torch.manual_seed(0)
    ref = tf.CLIPVisionModel(tf.CLIPVisionConfig(**arch)).eval()
    perturb_norms(ref, 5)
    ref.save_pretrained(tmp / "clip_vision")
    ours = load_clip(tmp / "clip_vision", component="vision")

    b, s = shp["batch"], arch["image_size"]
    px = np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)
    t_px, j_px = nchw(px), jnp.asarray(px)
    fwd = jitted(ours, lambda m, x: m(x))

    def torch_fn():
        out = ref(pixel_values=t_px)
        return out.last_hidden_state, out.pooler_output

    g = s // arch["patch_size"]
    desc = (f"ViT width {arch['hidden_size']} x {arch['num_hidden_layers']} layers, patch {arch['patch_size']}, "
            f"{s}px ({g * g + 1} tokens)")
    return [Case("CLIP vision", desc, b, torch_fn, lambda o: [o[0].numpy(), o[1].numpy()], lambda: fwd(j_px))]


# --- DINOv2 --------------------------------------------------------------------------------------

DINO = {
    "tiny": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14),
             dict(batch=2)),
    # ViT-S/14 width, 6 of its 12 layers, at 224 px (16x16 patches).
    "small": (dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, image_size=224, patch_size=14),
              dict(batch=2)),
}


def case_dinov2(size: str, tmp: Path) -> list[Case]:
    import transformers as tf

    arch, shp = DINO[size]
    torch.manual_seed(0)
    ref = tf.Dinov2Model(tf.Dinov2Config(**arch)).eval()
    perturb_norms(ref, 6)
    ref.save_pretrained(tmp / "dinov2")
    ours = load_dinov2(tmp / "dinov2")

    b, s = shp["batch"], arch["image_size"]
    px = np.random.default_rng(0).standard_normal((b, s, s, 3)).astype(np.float32)
    t_px, j_px = nchw(px), jnp.asarray(px)
    fwd = jitted(ours, lambda m, x: m(x))
    g = s // arch["patch_size"]
    desc = (f"ViT width {arch['hidden_size']} x {arch['num_hidden_layers']} layers, patch {arch['patch_size']}, "
            f"{s}px ({g * g + 1} tokens)")
    return [Case("DINOv2", desc, b, lambda: ref(pixel_values=t_px).last_hidden_state, lambda o: [o.numpy()],
                 lambda: fwd(j_px))]


BUILDERS: dict[str, Callable[[str, Path], list[Case]]] = {
    "flux": case_flux, "vae": case_vae, "t5": case_t5, "clip_text": case_clip_text,
    "clip_vision": case_clip_vision, "dinov2": case_dinov2,
}


# ------------------------------------------------------------------------------------------------
# Timing and report.


def median_ms(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@dataclass
class Row:
    model: str
    config: str
    batch: int
    ours_ms: float
    torch_ms: float
    err: float
    ok: bool


def run_case(case: Case, repeats: int) -> Row:
    with torch.no_grad():
        want = case.torch_np(case.torch_fn())  # also the reference's warm-up call
    got = jax.tree.leaves(jax.block_until_ready(case.jax_fn()))  # compiles
    assert len(got) == len(want), f"{case.model}: {len(got)} outputs vs reference {len(want)}"
    err, ok = 0.0, True
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, f"{case.model}: shape {g.shape} vs reference {w.shape}"
        e = float(np.max(np.abs(g - w)))
        err = max(err, e)
        ok &= e <= 1e-4 * max(1.0, float(np.max(np.abs(w))))

    jax.block_until_ready(case.jax_fn())  # one warm call after the compile
    ours = median_ms(case.jax_fn, repeats, jax.block_until_ready)
    with torch.no_grad():
        case.torch_fn()
        ref = median_ms(case.torch_fn, repeats, lambda out: out)
    return Row(case.model, case.config, case.batch, ours, ref, err, ok)


def table(rows: list[Row]) -> str:
    lines = ["| model | config | batch | ours ms | torch ms | ratio (torch/ours) | max abs err |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        err = f"{r.err:.1e}" + ("" if r.ok else " **FAIL**")
        lines.append(f"| {r.model} | {r.config} | {r.batch} | {r.ours_ms:.2f} | {r.torch_ms:.2f} | "
                     f"{r.torch_ms / r.ours_ms:.2f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small"), default="tiny")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model (median reported)")
    p.add_argument("--models", default=",".join(BUILDERS),
                   help=f"comma-separated subset of {','.join(BUILDERS)} (vae = decode and encode)")
    p.add_argument("--threads", type=int, default=usable_cores(), help="torch intra-op threads")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent JAX compilation cache in .cache/jax")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(BUILDERS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    if not args.no_compile_cache:  # as tests/conftest.py: compiles are slow on small CPUs
        jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    torch.set_num_threads(args.threads)

    print(machine_line(args.threads))
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(f"Size {args.size!r}, float32, median of {args.repeats} runs; ours = jax.jit after warm-up "
          f"(block_until_ready), torch = eager under no_grad.\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vipo_bench_") as tmp:
        for name in names:
            t0 = time.perf_counter()
            for case in BUILDERS[name](args.size, Path(tmp)):
                rows.append(run_case(case, args.repeats))
                r = rows[-1]
                print(f"  {r.model}: ours {r.ours_ms:.2f} ms, torch {r.torch_ms:.2f} ms, err {r.err:.1e}",
                      file=sys.stderr, flush=True)
            print(f"  ({name}: {time.perf_counter() - t0:.1f} s with build, load and compile)",
                  file=sys.stderr, flush=True)
            gc.collect()
    print(table(rows))
    if busy >= 0.5 * usable_cores():
        print(f"\nNote: load average {busy:.2f} on {usable_cores()} cores before the run: other processes compete "
              "for the CPU, so timings are noisy; multi-threaded torch suffers most (its OpenMP workers wait "
              "for each other at every op). Compare with --threads 1.")
    failed = [r.model for r in rows if not r.ok]
    if failed:
        print(f"\nParity FAILED (max abs err > 1e-4 x max(1, max|ref|)): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
