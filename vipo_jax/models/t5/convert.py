"""transformers ``T5EncoderModel`` / ``UMT5EncoderModel`` safetensors -> :class:`T5Encoder` params.

Also accepts the full encoder-decoder checkpoints (``T5ForConditionalGeneration`` and friends): their
``decoder.*`` and ``lm_head.*`` tensors are explicitly skipped; any other unused key is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.t5.config import T5Config
from vipo_jax.weights.loading import SourceKeys, linear

_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


def _decoder_part(key: str) -> bool:
    return key.startswith("decoder.") or key.startswith("lm_head.")


def convert_hf(tensors: Mapping[str, np.ndarray] | SourceKeys, cfg: T5Config,
               where: str = "T5 checkpoint") -> dict[str, np.ndarray]:
    src = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)
    out: dict[str, np.ndarray] = {}

    # The token embedding is tied: checkpoints hold ``shared.weight``, ``encoder.embed_tokens.weight``
    # or both (identical copies). ``shared`` is the source of the tie in transformers.
    present = [k for k in _EMBED_KEYS if k in src]
    if not present:
        raise CheckpointError(f"missing key 'shared.weight' (or 'encoder.embed_tokens.weight') in {src.where}")
    n, d, inner, ff = cfg.num_layers, cfg.d_model, cfg.inner_dim, cfg.d_ff

    def check(key: str, want: tuple[int, ...]) -> str:
        if key in src and src.shape(key) != want:
            raise CheckpointError(f"shape mismatch for {key} in {src.where}: checkpoint has {src.shape(key)}, "
                                  f"the config expects {want}")
        return key

    for k in present:
        check(k, (cfg.vocab_size, d))
    out["embed_tokens.embedding"] = src.take(present[0])
    for k in present[1:]:
        src.used.add(k)

    expected = {  # torch layouts, checked per layer so a bad layer is named before stacking
        "SelfAttention.q.weight": (inner, d), "SelfAttention.k.weight": (inner, d),
        "SelfAttention.v.weight": (inner, d), "SelfAttention.o.weight": (d, inner),
        "DenseReluDense.wi_0.weight": (ff, d), "DenseReluDense.wi_1.weight": (ff, d),
        "DenseReluDense.wi.weight": (ff, d), "DenseReluDense.wo.weight": (d, ff),
        "layer_norm.weight": (d,),
        "SelfAttention.relative_attention_bias.weight": (cfg.relative_attention_num_buckets, cfg.num_heads),
    }
    blk = lambda i, rest: f"encoder.block.{i}.layer.{rest}"

    def keys(name: str) -> list[str]:
        want = expected[name.split(".", 1)[1]]
        return [check(blk(i, name), want) for i in range(n)]

    lin = lambda name: src.stack(keys(name), linear)
    vec = lambda name: src.stack(keys(name))

    for p in ("q", "k", "v", "o"):
        out[f"blocks.attn.{p}.kernel"] = lin(f"0.SelfAttention.{p}.weight")
    out["blocks.attn_norm.weight"] = vec("0.layer_norm.weight")
    ff_names = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
    for p in ff_names:
        out[f"blocks.ff.{p}.kernel"] = lin(f"1.DenseReluDense.{p}.weight")
    out["blocks.ff_norm.weight"] = vec("1.layer_norm.weight")

    bias = "0.SelfAttention.relative_attention_bias.weight"
    if cfg.per_layer_bias:
        out["blocks.attn.relative_attention_bias.embedding"] = vec(bias)
    else:
        out["relative_attention_bias.embedding"] = src.take(keys(bias)[0])
    out["final_layer_norm.weight"] = src.take(check("encoder.final_layer_norm.weight", (d,)))

    src.check_all_used(ignore=_decoder_part)
    return out
