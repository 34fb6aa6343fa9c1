"""Built-in Mamba-style models: a sequence classifier and a language model.

Both are stacks of :class:`~torch_teleport.lab.models.mamba_block.MambaBlock`
in the usual pre-norm residual form ``h = h + block(norm(h))`` with a final
norm, as in the Mamba language models. The blocks are causal by
construction, so the language model needs no mask.
"""

from __future__ import annotations

from torch import Tensor, nn

from torch_teleport import hookimpl
from torch_teleport.lab.models.mamba_block import MambaBlock

NORMS = {"rms": nn.RMSNorm, "layer": nn.LayerNorm}


class ResidualMamba(nn.Module):
    """``h + block(norm(h))``."""

    def __init__(self, d_model: int, norm: str, **block_options) -> None:
        super().__init__()
        self.norm = NORMS[norm](d_model)
        self.mixer = MambaBlock(d_model, **block_options)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.mixer(self.norm(h))


class MambaStack(nn.Module):
    """``layers`` residual Mamba blocks and a final norm: ``(batch, time, d_model)`` in and out."""

    def __init__(self, d_model: int, layers: int, norm: str, **block_options) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
        self.layers = nn.ModuleList(
            ResidualMamba(d_model, norm, **block_options) for _ in range(layers)
        )
        self.norm = NORMS[norm](d_model)

    def forward(self, h: Tensor) -> Tensor:
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


class MambaClassifier(nn.Module):
    """Linear embedding of each step, Mamba stack, average over time, linear head."""

    def __init__(self, input_dim: int, num_classes: int, d_model: int, stack: MambaStack) -> None:
        super().__init__()
        self.embed = nn.Linear(input_dim, d_model)
        self.stack = stack
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stack(self.embed(x)).mean(dim=1))


class MambaLanguageModel(nn.Module):
    """Token embedding, Mamba stack, vocabulary head; logits ``(batch, vocab, time)`` as in the
    Transformer LM."""

    def __init__(self, vocab_size: int, d_model: int, stack: MambaStack) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.stack = stack
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.stack(self.embed(tokens))).transpose(1, 2)


def mamba_classifier(
    input_dim: int = 1,
    num_classes: int = 10,
    d_model: int = 64,
    layers: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    norm: str = "rms",
) -> MambaClassifier:
    """A Mamba-style sequence classifier, ``(batch, time, input_dim)`` -> class logits."""
    stack = MambaStack(d_model, layers, norm, d_state=d_state, d_conv=d_conv, expand=expand)
    return MambaClassifier(input_dim, num_classes, d_model, stack)


def mamba_lm(
    vocab_size: int = 10000,
    d_model: int = 256,
    layers: int = 4,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    norm: str = "rms",
) -> MambaLanguageModel:
    """A Mamba-style language model, ``(batch, time)`` token ids -> ``(batch, vocab, time)`` logits."""
    stack = MambaStack(d_model, layers, norm, d_state=d_state, d_conv=d_conv, expand=expand)
    return MambaLanguageModel(vocab_size, d_model, stack)


@hookimpl
def teleport_register_models(registry) -> None:
    registry.add_model("mamba_classifier", mamba_classifier)
    registry.add_model("mamba_lm", mamba_lm)
