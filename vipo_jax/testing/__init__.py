"""Helpers for the tests and benchmarks only, never imported by training, evaluation or the planner.

They need the PyTorch reference libraries (torch, diffusers, transformers), imported where used, so
importing this package costs nothing:

* :mod:`vipo_jax.testing.reference_pipelines`: tiny checkpoints written by the reference libraries in
  the real on-disk layouts (a diffusers FLUX.1 pipeline folder, a transformers DINOv2 folder, a
  transformers CLIPModel folder), for building pretrained worlds (``build_world``) without a download;
* :mod:`vipo_jax.testing.torch_reference`: one ViPO iteration in PyTorch organised like the reference
  scripts (DanceGRPO / ViPO);
* :mod:`vipo_jax.testing.parity`: our jitted iteration, on a pretrained world built from those
  checkpoints, against that PyTorch iteration on the same torch modules (``tests/test_vs_pytorch.py``,
  ``benchmarks/vs_pytorch.py``).
"""
