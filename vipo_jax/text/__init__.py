"""Text side of the pipelines: tokenizers and the cached prompt embeddings."""
