"""Built-in feed-forward models (MLP, CNN, residual network), registered by name for configs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torch_teleport import hookimpl

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(
    input_dim: int = 784,
    hidden: Sequence[int] = (1024, 1024),
    output_dim: int = 10,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """The paper's MLP (784-1024-1024-10, ReLU) by default; flattens image inputs."""
    _activation(activation)
    widths = [input_dim, *hidden, output_dim]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 3,
    channels: Sequence[int] = (16, 32, 64),
    num_classes: int = 10,
    image_size: int | Sequence[int] = 32,
    kernel_size: int = 3,
    activation: str = "relu",
) -> nn.Sequential:
    """The paper's CIFAR CNN: channels 3-16-32-64, each conv then the activation and a 2x2 max-pool.

    Convolutions keep the spatial size (``'same'`` padding), so ``image_size``
    only decides the width of the linear head; it is measured with one dummy
    forward pass, so 32x32 CIFAR and 8x8 digits both work.
    """
    _activation(activation)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip([in_channels, *channels[:-1]], channels, strict=True):
        layers += [nn.Conv2d(fan_in, fan_out, kernel_size, padding="same"), _activation(activation)]
        layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers, nn.Flatten())
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    try:
        with torch.no_grad():
            flat = features(torch.zeros(1, in_channels, height, width)).shape[1]
    except RuntimeError as error:  # a max-pool met a 1-pixel map
        raise ValueError(
            f"image_size {image_size} is too small for {len(channels)} 2x2 max-pools"
        ) from error
    return nn.Sequential(*features, nn.Linear(flat, num_classes))


class ResidualStage(nn.Module):
    """An entry conv that changes width and resolution (stride), then residual blocks of two convs.

    The skip connection joins tensors of equal shape only, so it needs no
    projection layer.
    """

    def __init__(
        self, in_channels: int, width: int, stride: int, blocks: int, batch_norm: bool
    ) -> None:
        super().__init__()
        self.entry = _conv_unit(in_channels, width, stride, batch_norm)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                _conv_unit(width, width, 1, batch_norm),
                _conv_unit(width, width, 1, batch_norm, relu=False),
            )
            for _ in range(blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return x


def _conv_unit(
    fan_in: int, fan_out: int, stride: int, batch_norm: bool, relu: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(fan_out))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def resnet(
    in_channels: int = 3,
    widths: Sequence[int] = (64, 128, 256),
    blocks: int = 1,
    strides: Sequence[int] = (2, 2, 2),
    num_classes: int = 200,
    batch_norm: bool = False,
) -> nn.Sequential:
    """The paper's Tiny-ImageNet residual network.

    Each stage is an entry conv plus ``blocks`` residual blocks of two convs,
    so the defaults give the paper's channels 3-64,64,64-128,128,128-256,256,256
    with one residual connection per width (three in all). Strides replace
    pooling; global average pooling and a linear head classify. The paper
    does not mention normalisation, so ``batch_norm`` is off by default; when
    on, the BatchNorm affine parameters stay fixed during a teleport.
    """
    if len(widths) != len(strides):
        raise ValueError(f"one stride per stage: {len(widths)} widths but {len(strides)} strides")
    stages = [
        ResidualStage(fan_in, width, stride, blocks, batch_norm)
        for fan_in, width, stride in zip([in_channels, *widths[:-1]], widths, strides, strict=True)
    ]
    return nn.Sequential(
        *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)
    )


@hookimpl
def teleport_register_models(registry) -> None:
    registry.add_model("mlp", mlp)
    registry.add_model("cnn", cnn)
    registry.add_model("resnet", resnet)
