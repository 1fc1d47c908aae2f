"""Add the callbacks to your own Trainer: your LightningModule, your ResNet, no other change."""

import pytorch_lightning as pl
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from resode_lightning import ODEForm, SmoothnessMonitor


class MyModule(pl.LightningModule):  # any module holding a ResNet, under any attribute name
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=10)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), 8)
monitor = SmoothnessMonitor(every_n_steps=1)  # logs smoothness/<stage>/<metric>
trainer = pl.Trainer(
    max_epochs=1,
    callbacks=[ODEForm(), monitor],  # ODEForm: train in ODE form (optional)
    logger=pl.loggers.CSVLogger("runs"),
    enable_progress_bar=False,
)
trainer.fit(MyModule(), data)
print({k: round(float(v), 3) for k, v in trainer.callback_metrics.items() if "lipschitz" in k})
