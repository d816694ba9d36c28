"""PyTorch eager baseline: ResNet-18 with the CIFAR stem, one SGD training step on CPU.

The yardstick for gapjax's own ResNet-18 step (``train_throughput.py --model resnet18``):
the same architecture (3x3/1 stem without max pool, basic blocks [2, 2, 2, 2], GAP head,
10 classes), 32x32 inputs, the same batch, float32, SGD with momentum and weight decay,
cross-entropy, in PyTorch's default eager mode on the same machine.

    pip install torch==2.13.0            # the `bench` extra
    python benchmarks/torch_resnet18.py --batch 64 [--out FILE]

torch is imported only here, so nothing else in the project depends on it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, emit, time_calls


def build_resnet18_cifar(torch, num_classes: int):
    """ResNet-18 (torchvision layout) with the CIFAR stem, written with torch.nn."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, in_channels: int, channels: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.shortcut = nn.Sequential()
            if stride != 1 or in_channels != channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                    nn.BatchNorm2d(channels),
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class ResNet18Cifar(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(64), nn.ReLU())
            layers, in_channels = [], 64
            for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [BasicBlock(in_channels, channels, stride),
                           BasicBlock(channels, channels, 1)]
                in_channels = channels
            self.layers = nn.Sequential(*layers)
            self.classifier = nn.Linear(512, num_classes)

        def forward(self, x):
            features = self.layers(self.stem(x))
            return self.classifier(features.mean(dim=(2, 3)))

    return ResNet18Cifar()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: all cores, like XLA)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)

    import torch  # the optional `bench` extra

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build_resnet18_cifar(torch, num_classes=10).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    # NCHW is PyTorch's native (and fastest eager) layout on CPU.
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    # The warm-up call allocates buffers and picks kernels.
    timing = time_calls(step, repeats=repeats, warmup=1)
    emit({
        "benchmark": "torch_resnet18",
        "framework": f"torch {torch.__version__} eager",
        "model": "resnet18 (cifar stem)",
        "batch": args.batch,
        "image_size": args.image_size,
        "dtype": "float32",
        "threads": args.threads,
        "step_time_s": timing["median"],
        "step_time_min_s": timing["min"],
        "step_cpu_s": timing["cpu_median"],
        "examples_per_s": args.batch / timing["median"],
        "examples_per_cpu_s": args.batch / max(timing["cpu_median"], 1e-9),
        "repeats": repeats,
    }, args.out)


if __name__ == "__main__":
    main()
