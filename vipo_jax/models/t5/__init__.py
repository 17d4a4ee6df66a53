"""T5 v1.1 / UMT5 text encoder (FLUX.1 ``text_encoder_2`` = T5-XXL, Wan2.1 ``text_encoder`` = UMT5-XXL)."""

from vipo_jax.models.t5.config import T5Config
from vipo_jax.models.t5.convert import convert_hf
from vipo_jax.models.t5.loading import from_pretrained
from vipo_jax.models.t5.model import T5Encoder

__all__ = ["T5Config", "T5Encoder", "convert_hf", "from_pretrained"]
