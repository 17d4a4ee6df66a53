"""The PyTorch references for the tests and benchmarks only: outside the ``vipo_jax`` package (not
installed with it), so torch never enters the library.

They need the PyTorch reference libraries (torch, diffusers, transformers), imported where used, so
importing this package costs nothing:

* :mod:`pytorch_reference.reference_pipelines`: tiny checkpoints written by the reference libraries in
  the real on-disk layouts (a diffusers FLUX.1 pipeline folder, a transformers DINOv2 folder, a
  transformers CLIPModel folder), for building pretrained worlds (``build_world``) without a download;
* :mod:`pytorch_reference.torch_reference`: one ViPO iteration in PyTorch organised like the reference
  scripts (DanceGRPO / ViPO);
* :mod:`pytorch_reference.parity`: our jitted iteration, on a pretrained world built from those
  checkpoints, against that PyTorch iteration on the same torch modules (``tests/test_vs_pytorch.py``,
  ``benchmarks/vs_pytorch.py``).
"""
