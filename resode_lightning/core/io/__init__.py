"""Reading and writing files, at the bottom of the package: it imports nothing else of it.

- ``checkpoint``: the safe reader of ``torch.save`` and safetensors files (the package's only
  ``torch.load``), sizes checked before anything is allocated; ``pickle_scan`` replays their
  pickles on placeholders for those checks.
- ``arrays``: the safe reader of pickles of numpy arrays (CIFAR-10 batches).
- ``atomic``: writes that leave a whole file or none.
"""
