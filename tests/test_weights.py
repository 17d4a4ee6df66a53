"""The weights layer on its own: safetensors reading without torch, and strict loading errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.weights.loading import SourceKeys, check_float_dtype, conv, linear, load_into
from vipo_jax.weights.native import load_native, save_native
from vipo_jax.weights.safetensors_io import SafetensorsFile, open_checkpoint, save_safetensors


class Tiny(nnx.Module):
    def __init__(self, cfg=None, *, rngs):
        self.a = nnx.Linear(3, 4, rngs=rngs)
        self.b = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


def _tensors():
    rng = np.random.default_rng(0)
    return {"a.kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "a.bias": rng.normal(size=(4,)).astype(np.float32),
            "b.kernel": rng.normal(size=(4, 2)).astype(np.float32)}


def test_roundtrip_matches_reference_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    t = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(5, np.int64),
         "z": np.zeros((0, 2), np.float16)}
    save_file(t, tmp_path / "ref.safetensors")
    ours = SafetensorsFile(tmp_path / "ref.safetensors")
    for k in t:
        np.testing.assert_array_equal(ours[k], t[k])
    save_safetensors(tmp_path / "ours.safetensors", t, metadata={"k": "v"})
    back = load_file(tmp_path / "ours.safetensors")
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    assert SafetensorsFile(tmp_path / "ours.safetensors").metadata == {"k": "v"}
    save_safetensors(tmp_path / "scalar.safetensors", {"s": np.array(2.5, np.float32)})
    assert SafetensorsFile(tmp_path / "scalar.safetensors")["s"].shape == ()


def test_bfloat16_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    x = torch.randn(4, 3).to(torch.bfloat16)
    save_file({"w": x}, tmp_path / "bf.safetensors")
    w = SafetensorsFile(tmp_path / "bf.safetensors")["w"]
    assert w.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(w.astype(np.float32), x.float().numpy())


def test_truncated_file_is_a_clear_error(tmp_path):
    save_safetensors(tmp_path / "m.safetensors", _tensors())
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(tmp_path / "tiny.safetensors")
    (tmp_path / "head.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError):
        SafetensorsFile(tmp_path / "head.safetensors")


def test_sharded_index(tmp_path):
    t = _tensors()
    save_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a.kernel": t["a.kernel"]})
    save_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                     {"a.bias": t["a.bias"], "b.kernel": t["b.kernel"]})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.kernel": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors",
        "b.kernel": "model-00002-of-00002.safetensors"}}))
    ckpt = open_checkpoint(tmp_path, stem="model")
    assert sorted(ckpt) == sorted(t)
    model = load_into(nnx.eval_shape(lambda: Tiny(rngs=nnx.Rngs(0))), ckpt)
    np.testing.assert_array_equal(model.b.kernel[...], t["b.kernel"])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path, stem="model")


def test_missing_checkpoint_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path, stem="model")


def test_strict_loading_errors():
    abstract = nnx.eval_shape(lambda: Tiny(rngs=nnx.Rngs(0)))
    t = _tensors()
    with pytest.raises(CheckpointError, match="missing weights for .*a.bias"):
        load_into(abstract, {k: v for k, v in t.items() if k != "a.bias"})
    with pytest.raises(CheckpointError, match=r"shape mismatch for a.kernel.*\(4, 3\).*\(3, 4\)"):
        load_into(abstract, {**t, "a.kernel": t["a.kernel"].T})
    with pytest.raises(CheckpointError, match="unknown parameters"):
        load_into(abstract, {**t, "c.kernel": t["a.bias"]})
    with pytest.raises(CheckpointError, match="non-float"):
        load_into(abstract, {**t, "a.bias": np.arange(4)})


def test_source_keys_tracks_missing_and_unexpected():
    src = SourceKeys({"w": np.ones((2, 3)), "extra": np.ones(1)}, where="ckpt.safetensors")
    assert linear(src.take("w")).shape == (3, 2)
    with pytest.raises(CheckpointError, match="missing key 'nope' in ckpt.safetensors"):
        src.take("nope")
    with pytest.raises(CheckpointError, match="unexpected keys in ckpt.safetensors: \\['extra'\\]"):
        src.check_all_used()
    assert conv(np.zeros((8, 3, 5, 7))).shape == (5, 7, 3, 8)


def test_dtype_requests():
    assert check_float_dtype("bfloat16", "x") == jnp.bfloat16
    with pytest.raises(CheckpointError, match="float32, bfloat16 or float16"):
        check_float_dtype("int8", "param_dtype")
    with pytest.raises(CheckpointError, match="unknown dtype"):
        check_float_dtype("floaty", "param_dtype")


def test_native_roundtrip_and_missing_config(tmp_path):
    m = Tiny(rngs=nnx.Rngs(1))
    save_native(m, tmp_path / "tiny", {"width": 4}, kind="tiny")
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        width: int = 0

    back = load_native(tmp_path / "tiny", "tiny", Cfg, Tiny)
    np.testing.assert_array_equal(back.a.kernel[...], m.a.kernel[...])
    with pytest.raises(CheckpointError, match="expected 'other'"):
        load_native(tmp_path / "tiny", "other", Cfg, Tiny)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_native(tmp_path, "tiny", Cfg, Tiny)


def test_placement_into_shardings_on_several_devices(tmp_path):
    """load_into puts each leaf straight into its target sharding (4 simulated CPU devices)."""
    import subprocess
    import sys
    import textwrap

    save_safetensors(tmp_path / "w.safetensors", _tensors())
    code = textwrap.dedent(f"""
        import jax, numpy as np
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec as P
        from tests.test_weights import Tiny
        from vipo_jax.weights.loading import load_into
        from vipo_jax.weights.safetensors_io import open_checkpoint
        mesh = jax.make_mesh((4,), ("fsdp",))
        def shard(name, a):
            spec = P(*(None,) * (len(a.shape) - 1), "fsdp") if a.shape[-1] % 4 == 0 else P()
            return NamedSharding(mesh, spec)
        m = load_into(nnx.eval_shape(lambda: Tiny(rngs=nnx.Rngs(0))), open_checkpoint(r"{tmp_path}/w.safetensors"),
                      sharding=shard)
        k = m.a.kernel[...]
        assert len(k.sharding.device_set) == 4 and k.sharding.spec == P(None, "fsdp"), k.sharding
        assert m.b.kernel[...].sharding.spec == P()
        print("ok", k.addressable_shards[0].data.shape)
    """)
    os_env = __import__("os").environ
    env = {**os_env, "XLA_FLAGS": f"{os_env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (3, 1)" in out.stdout
