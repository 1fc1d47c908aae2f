"""Export a ResNet as a neural ODE, run it with fewer steps or another solver, save and load it."""

import torch

from resode_lightning import export_neural_ode, load_neural_ode, ode_resnet, save_neural_ode

model = ode_resnet(depths=(8, 8), widths=(16, 32), init="smooth", seed=0).eval()  # or your ResNet
x = torch.randn(4, 3, 32, 32)

ode = export_neural_ode(model)  # Euler on the original grid: the same outputs
half = export_neural_ode(model, steps=0.5)  # half the steps, weights interpolated in depth
rk4 = export_neural_ode(model, method="rk4", steps=2, gradient="adjoint")  # O(1) memory in depth
with torch.no_grad():
    print(f"export error {(ode(x) - model(x)).abs().max() / model(x).abs().max():.1e}")
    print(f"half the steps changes the output by {(half(x) - ode(x)).norm() / ode(x).norm():.1e}")
    print(f"rk4 with 2 steps per stage: {tuple(rk4(x).shape)}")

save_neural_ode(ode, "model_ode.pt")  # weights + JSON config, loads without unpickling
assert torch.allclose(load_neural_ode("model_ode.pt")(x), ode(x))
