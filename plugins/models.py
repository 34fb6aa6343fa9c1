"""Built-in models, registered by name so configs can refer to them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from torch_teleport import hookimpl

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(
    input_dim: int = 784,
    hidden: Sequence[int] = (1024, 1024),
    output_dim: int = 10,
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """The paper's MLP (784-1024-1024-10, ReLU) by default; flattens image inputs."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    widths = [input_dim, *hidden, output_dim]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@hookimpl
def teleport_register_models(registry) -> None:
    registry.add_model("mlp", mlp)
