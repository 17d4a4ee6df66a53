"""Planning full-size runs: analytic FLOPs and (``python -m vipo_jax.plan``) compiled memory."""
