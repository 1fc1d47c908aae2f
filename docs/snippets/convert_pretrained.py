"""Convert a pretrained torchvision ResNet to ODE form: the same function, rescaled stages."""

from pathlib import Path

import torch
import torchvision

from resode_lightning import find_stages, load_into, load_state_dict_file, to_ode_form

weights = Path("resnet50-11ad3fa6.pth")  # torchvision's file, from ~/.cache/torch/hub/checkpoints
if not weights.exists():  # a stand-in, so that this snippet runs anywhere
    torch.save(torchvision.models.resnet50().state_dict(), weights)

model = load_into(torchvision.models.resnet50(), load_state_dict_file(weights)).eval()
ode = to_ode_form(model)  # a copy; pass inplace=True to convert in place
print(find_stages(ode))  # [Stage('layer1', 2 x Bottleneck, ODE form, horizon=1), ...]

x = torch.randn(2, 3, 224, 224)
with torch.no_grad():
    error = (ode(x) - model(x)).abs().max() / model(x).abs().max()
print(f"max relative change of the output: {error:.1e}")  # about 1e-7 in float32
torch.save(ode.state_dict(), "resnet50_ode.pth")  # or: resode convert --arch resnet50 ...
