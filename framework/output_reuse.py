"""Layer outputs an evaluation computed, handed to the tangent pass that follows it at the same weights.

Forward mode computes a layer's output beside its tangent; for a Linear or
convolution layer that is one of three products, and the output is the one
the evaluation at the same weights computed just before. Where the layer's
projector gives the tangent alone (:meth:`~torch_teleport.Projector.output_tangent`),
the evaluation's forward keeps each output and the tangent pass returns it,
dual with the tangent, instead of computing it again. The update is the same
(to the bit where the kernels are deterministic): the pass's primal values
are the evaluation's.

A kept output is used only where the layer's parameters are as they were
when it was kept and the output was not changed in place since (their version
counters), and the layer's input has the shape it had; otherwise the layer
runs as it is. Outputs are kept only at the layers a pass reaches (a pass
ends at the last moving layer's inputs): the first evaluation keeps none, and
its pass says which layers those are. Keeping a language model's logits for a
pass that never computes them cost 4 MiB beside its first backward.

An output is kept only where it is no larger than the layer's input, which the
backward holds for the weight's gradient anyway: the evaluation then holds at
most twice what it held for those layers. Keeping every output raised the
teleport's peak memory by up to a quarter (a Transformer regressor: 69.5 ->
85.6 MiB, its feed-forward layers' wide hidden outputs).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch.autograd.forward_ad as fwAD
from torch import Size, Tensor, nn
from torch.utils.hooks import RemovableHandle

from .coverage import CoveredModule


@dataclass(frozen=True)
class _Kept:
    output: Tensor  # detached: shares the output's storage and version counter
    version: int
    input_shape: Size
    weights: tuple[int, ...]  # the versions of the layer's own parameters


Layers = dict[int, tuple[nn.Module, Callable[[Tensor], Tensor]]]
"""Layers that can take their outputs back, by ``id``: each module and its output's tangent alone."""


def taking_back(modules: Iterable[CoveredModule]) -> Layers:
    """The layers of ``modules`` whose projector gives their output's tangent alone
    (:meth:`~torch_teleport.Projector.output_tangent`); asked once per teleport, not per evaluation."""
    layers = {}
    for covered in modules:
        tangent = covered.projector.output_tangent(covered.module)
        if tangent is not None:
            layers[id(covered.module)] = (covered.module, tangent)
    return layers


class ReusedOutputs:
    """The outputs of one evaluation's forward at ``layers`` (see :func:`taking_back`), kept at the
    layers in ``keeping`` (their ``id``; none where ``None``)."""

    def __init__(self, layers: Layers, keeping: set[int] | None) -> None:
        self._layers = layers
        self._keeping = keeping or set()
        self._kept: dict[int, list[_Kept]] = defaultdict(list)
        self.reached: set[int] = set()  # the layers (``id``) a pass ran
        self.used: set[int] = set()  # the layers whose kept output a pass took

    def listen(self) -> list[RemovableHandle]:
        """Hooks that keep each call's output, as the layer's forward returned it (before any other hook)."""
        handles = []
        for key, (module, _) in self._layers.items():
            if key not in self._keeping:
                continue

            def keep(module: nn.Module, args: tuple, output: Tensor, key: int = key) -> None:
                if output.numel() <= args[0].numel():
                    self._kept[key].append(
                        _Kept(output.detach(), output._version, args[0].shape, _versions(module))
                    )

            handles.append(module.register_forward_hook(keep, prepend=True))
        return handles

    @contextlib.contextmanager
    def reused(self) -> Iterator[None]:
        """Around a forward-mode pass (entered before the pass swaps in its dual parameters): each layer
        whose parameters are as they were when its outputs were kept returns them, one per call. The
        kept outputs are dropped on exit; :attr:`reached` names the layers the pass ran."""
        swapped, handles = [], []
        try:
            for key, (module, tangent) in self._layers.items():
                handles.append(module.register_forward_pre_hook(lambda module, args: self.reached.add(id(module))))
                kept = self._kept.get(key)
                if kept and "forward" not in vars(module) and all(k.weights == _versions(module) for k in kept):
                    module.forward = self._forward(key, module, tangent)
                    swapped.append(module)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in swapped:
                del module.forward
            self._kept.clear()

    def _forward(self, key: int, module: nn.Module, tangent: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        kept = self._kept[key]

        def forward(inputs: Tensor) -> Tensor:
            this = kept.pop(0) if kept else None
            if this is None or this.output._version != this.version or fwAD.unpack_dual(inputs).primal.shape != this.input_shape:
                return type(module).forward(module, inputs)
            self.used.add(key)
            return fwAD.make_dual(this.output, tangent(inputs))

        return forward


def _versions(module: nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in module.parameters(recurse=False))
