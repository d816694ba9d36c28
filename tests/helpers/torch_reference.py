"""Imports the PyTorch reference libraries (torch, torchvision, timm, pytorch-grad-cam).

The ``torch`` extra pins the CPU build of torch; torchvision's wheel from the package index
carries compiled operators built against another torch and fails at import with
``operator torchvision::nms does not exist`` while registering their meta kernels. The
model definitions the tests compare against are pure Python, so when that import fails
the meta-kernel registration module is replaced by an empty one and the import retried:
torchvision's models, transforms and everything timm and pytorch-grad-cam use load, only
its compiled detection operators (nms, roi_align, ...) stay unavailable.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_torchvision():
    """``torchvision``, importable even when its compiled operators do not load."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [name for name in sys.modules if name.startswith("torchvision")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType(
        "torchvision._meta_registrations")
    return importlib.import_module("torchvision")


def import_timm():
    """``timm`` (which imports torchvision)."""
    import_torchvision()
    return importlib.import_module("timm")


def import_grad_cam():
    """``pytorch_grad_cam`` (which imports torchvision)."""
    import_torchvision()
    return importlib.import_module("pytorch_grad_cam")


def randomize_(module, seed: int):
    """A torch module with random BatchNorm affine parameters, running statistics and
    counters, and random biases (the default init leaves them trivial: 1, 0, 0, 1); returns
    it in eval mode. Parity tests use it so that no layer is an identity by accident."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.BatchNorm2d):
                sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
                sub.running_mean.copy_(0.1 * torch.randn(sub.running_mean.shape,
                                                         generator=generator))
                sub.running_var.copy_(0.5 + 1.5 * torch.rand(sub.running_var.shape,
                                                             generator=generator))
                sub.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,),
                                                                generator=generator)))
            elif isinstance(sub, torch.nn.Linear | torch.nn.Conv2d) and sub.bias is not None:
                sub.bias.copy_(0.05 * torch.randn(sub.bias.shape, generator=generator))
    return module.eval()
