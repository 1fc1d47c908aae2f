"""A timm ResNet out of the box: stages found, ODE form, neural ODE export, save and load."""

import timm
import torch

from resode_lightning import (
    export_neural_ode,
    find_stages,
    load_neural_ode,
    save_neural_ode,
    to_ode_form,
)

# zero_init_last=False: random last norms, so that the branches are not zero at init
net = timm.create_model("resnet34d", num_classes=10, zero_init_last=False).eval()
print(find_stages(net))  # layer1 … layer4: 3, 3, 5 and 2 identity blocks
same = to_ode_form(net)  # branches × 1/L, last norm of each branch × L: the same function
ode = export_neural_ode(net)  # Euler, one step per block: the same outputs
save_neural_ode(ode, "resnet34d_ode.pt")
ode = load_neural_ode("resnet34d_ode.pt", model=timm.create_model("resnet34d", num_classes=10))
x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    print(float((ode(x) - net(x)).abs().max() / net(x).abs().max()))  # about 1e-7
