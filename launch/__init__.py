"""Launchers: TPU VM slices (launch/tpu), one GPU node and SLURM (launch/gpu), and sweeps (launch.sweep)."""
