"""Benchmark the memory of one training step: a ResNet stage against the neural ODE's gradients."""

import torch

from resode_lightning.apps.memory_benchmark import memory_benchmark

device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: a peak-RSS proxy (Linux only)
if device == "cpu":
    torch.set_num_threads(1)  # as `resode bench` does by default
result = memory_benchmark(
    steps=(4, 16), modes=("plain", "checkpoint", "adjoint"), device=device, repeats=1
)
for row in result["rows"]:
    print(f"{row['mode']:>10} {row['steps']:>3} steps: {row['peak_bytes'] / 2**20:7.2f} MiB")
ratio = result["ratios"]["adjoint_peak_ratio_max_over_min_steps"]
print(f"adjoint peak memory, 16 steps / 4 steps: {ratio:.2f}")  # constant in depth: about 1
