"""Teleporting data-parallel replicas: one null space and one update for the global batch.

Under ``torch.distributed`` every rank holds a replica of the model and its
own shard of the teleport batch. Teleporting each replica on its shard
would move the replicas apart (their gradients and null spaces differ);
:class:`Replicas` is the seam through which the engine makes every rank
compute the teleport of the *global* batch (the concatenation of the
shards, in rank order) instead:

* **null space** -- each covered site's spectrum is that of the global
  representation. When :func:`~torch_teleport.null_space.spectrum` would
  take its Gram route, ranks all-reduce their ``d x d`` float64 Gram
  matrices; otherwise they all-gather their representations (a copy, so
  every rank holds the same matrix). Either way each rank runs the same
  eigen-/singular-value decomposition on the same numbers.
* **figures** -- loss, gradient norm and objective are sample-weighted
  means over ranks (one all-reduce of the loss gradients and two scalars
  per evaluation): the loss and gradient norm reported are those of the
  global batch, for a mean-reduced ``loss_fn``.
* **update** -- the teleport ascends the sample-weighted mean of the
  ranks' objectives; its gradient is all-reduced *before* projection, so
  every rank projects and scales the same tensor with the same basis.

Every decision the engine takes (stop at the cap, roll back on a
non-finite value, skip a bad batch) reads these global numbers, so all
ranks take it together and none waits in a collective the others left.
The result is bit-identical on every rank when the collectives hand every
rank the same bits (gloo and NCCL rings do) and the ranks run the same
kernels; ``verify=True`` checks it after each teleport.

A model sharded with FSDP2 teleports through the same seams, its global
gradient and update taken from FSDP's own passes
(:mod:`~torch_teleport.sharded_path`). Launching processes is the lab's
business (``torch_teleport.lab.launch``). See ``docs/scale.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .inputs import batch_size
from .null_space import Spectrum, float64_gram, gram_spectrum, spectrum, uses_gram_route
from .objective import Batch, Evaluation
from .sharding import local, shard_key

DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
"""Representation dtypes, by the code ranks exchange to agree on one."""


class ReplicaDivergenceError(RuntimeError):
    """The replicas' parameters differ after a teleport (found by ``Replicas(verify=True)``)."""


class InvalidBatchElsewhereError(ValueError):
    """Another rank's teleport batch was rejected, so this rank skips the teleport too."""


def underlying_module(model: nn.Module) -> nn.Module:
    """The module a wrapper runs (``model`` itself when it is not wrapped).

    A teleport runs on the underlying module: a forward through the
    ``DistributedDataParallel`` wrapper would prepare a gradient reduction
    that the teleport's own ``autograd.grad`` calls never complete, and a
    ``torch.compile``d module (``OptimizedModule``) shares its parameters with
    the original in ``_orig_mod``, which runs eagerly with hooks and
    forward-mode derivatives. Wrappers may nest (a compiled DDP model).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class Replicas:
    """The data-parallel replicas a teleport keeps identical.

    ``Replicas()`` joins the default process group once one is initialised
    with more than one rank (checked at each teleport, so it may be built
    before ``init_process_group``) and is a single process otherwise;
    ``group`` names another process group; :meth:`this_process` never
    communicates (to teleport one replica on purpose). With
    ``verify=True`` every teleport ends by comparing parameter checksums
    across ranks and raises :class:`ReplicaDivergenceError` on a mismatch
    (one all-gather of one integer per parameter tensor).

    Collectives run on CUDA tensors when the group's backend is NCCL and on
    CPU tensors otherwise (gloo).
    """

    def __init__(self, group: Any = None, *, verify: bool = False) -> None:
        self.group = group
        self.verify_after = bool(verify)
        self._alone = False

    @classmethod
    def this_process(cls) -> Replicas:
        """Replicas that never communicate: the teleport moves this process's model alone."""
        replicas = cls()
        replicas._alone = True
        return replicas

    @property
    def size(self) -> int:
        """The number of replicas (1 outside an initialised process group)."""
        if self._alone or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def __repr__(self) -> str:
        return f"Replicas(size={self.size}, verify={self.verify_after})"

    # -- agreement on the batch ---------------------------------------------------------
    def check_together(self, check: Callable[..., None], *args: Any) -> None:
        """Run ``check(*args)`` on every rank; if it fails anywhere, raise everywhere.

        The failing rank re-raises its own error; the others raise
        :class:`InvalidBatchElsewhereError` naming the failing ranks, so no
        rank enters a teleport's collectives alone.
        """
        error: Exception | None = None
        try:
            check(*args)
        except (TypeError, ValueError) as caught:
            error = caught
        if self.size > 1:
            flags = self._all_gather_ints([int(error is not None)])[:, 0]
            failing = [rank for rank, flag in enumerate(flags.tolist()) if flag]
            if failing:
                messages = [None] * self.size
                dist.all_gather_object(messages, None if error is None else str(error), group=self.group)
                if error is None:
                    reasons = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failing)
                    raise InvalidBatchElsewhereError(
                        f"the teleport batch was rejected on another rank ({reasons}); every rank "
                        "skips this teleport"
                    )
        if error is not None:
            raise error

    # -- the global null space ----------------------------------------------------------
    def spectrum(self, representation: Tensor | None, *, leading: bool = False) -> Spectrum | None:
        """The spectrum of the global representation of one site; ``None`` if no rank saw samples.

        ``representation`` is this rank's ``(groups, dims, samples)``
        matrix, or ``None`` when the site's module did not run here;
        ``leading`` as for :func:`~torch_teleport.null_space.spectrum`.
        """
        if self.size == 1:
            return None if representation is None else spectrum(representation, leading=leading)
        shape = list(representation.shape) if representation is not None else [0, 0, 0]
        code = DTYPES.index(representation.dtype) if representation is not None else -1
        headers = self._all_gather_ints([*shape, code])
        present = headers[headers[:, 2] > 0]
        if len(present) == 0:
            return None
        if (present[:, [0, 1, 3]] != present[0, [0, 1, 3]]).any():
            raise ValueError(f"replicas disagree on a site's representation (groups, dims, samples, dtype): {headers.tolist()}")
        groups, dims, _, code = (int(v) for v in present[0])
        dtype = DTYPES[code]
        counts = headers[:, 2].tolist()
        total = sum(counts)
        device = self._device()
        local = (
            representation.detach().to(device=device)
            if representation is not None and representation.shape[2] > 0
            else torch.zeros(groups, dims, 0, dtype=torch.float64, device=device)
        )
        if uses_gram_route(dims, total, dtype):
            gram = float64_gram(local)
            dist.all_reduce(gram, group=self.group)
            return gram_spectrum(gram, total, dtype)
        local = local.double()
        width = max(counts)
        padded = torch.zeros(groups, dims, width, dtype=torch.float64, device=device)
        padded[..., : local.shape[2]] = local
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded, group=self.group)
        parts = [block[..., :count] for block, count in zip(gathered, counts, strict=True)]
        return spectrum(torch.cat(parts, dim=-1).to(dtype), leading=leading)

    # -- global figures and one update --------------------------------------------------
    def combine(self, evaluation: Evaluation, batch: Batch) -> Evaluation:
        """This rank's evaluation turned into the global batch's.

        ``loss`` and ``grad_norm`` become those of the global batch
        (sample-weighted means of the ranks' losses and loss gradients).
        ``value`` is the sample-weighted mean of the ranks' objectives; its
        graph carries this rank's share only, so summing the gradients of
        ``value`` over ranks (:meth:`sum`) gives the global objective's
        gradient.
        """
        grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
        global_value, loss, grad_norm, fraction = self._global_figures(evaluation, batch, grads)
        share = evaluation.value * fraction
        return Evaluation(value=share - share.detach() + global_value, loss=loss, grad_norm=grad_norm)

    def combine_structured(self, evaluation: Any, batch: Batch, grads: Sequence[Tensor]) -> Any:
        """:meth:`combine` for a structured evaluation, whose loss gradients ``grads`` are at hand.

        Its ``value`` becomes the global objective and its ``share`` this
        rank's weight, by which the engine scales this rank's gradient before :meth:`sum`.
        """
        evaluation.value, evaluation.loss, evaluation.grad_norm, evaluation.share = self._global_figures(
            evaluation, batch, grads
        )
        return evaluation

    def _global_figures(
        self, evaluation: Evaluation, batch: Batch, grads: Sequence[Tensor | None]
    ) -> tuple[Tensor, Tensor, Tensor, float]:
        """Global objective, loss and gradient norm, and this rank's fraction of the samples."""
        device = self._device()
        samples = float(batch_size(batch.inputs))
        flat = [
            (g if g is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float64)
            for g, p in zip(grads, batch.parameters, strict=True)
        ]
        scalars = torch.stack([t.detach().to(device, torch.float64) for t in (evaluation.loss, evaluation.value)])
        packed = torch.cat([*flat, scalars, torch.ones(1, dtype=torch.float64, device=device)]) * samples
        dist.all_reduce(packed, group=self.group)
        total = packed[-1]
        mean = packed[:-1] / total
        global_value = mean[-1].to(evaluation.value.device, evaluation.value.dtype)
        loss = mean[-2].to(evaluation.loss.device, evaluation.loss.dtype)
        return global_value, loss, torch.linalg.vector_norm(mean[:-2]), samples / float(total)

    def mean(self, value: float, samples: int) -> float:
        """The sample-weighted mean of ``value`` over ranks (``value`` itself in one process)."""
        if self.size == 1:
            return value
        packed = torch.tensor([value * samples, float(samples)], dtype=torch.float64, device=self._device())
        dist.all_reduce(packed, group=self.group)
        return float(packed[0] / packed[1])

    def sum(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The sum over ranks of each tensor, the same on every rank (one all-reduce, in float64)."""
        if self.size == 1 or not tensors:
            return tensors
        device = self._device()
        packed = torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors.values()])
        dist.all_reduce(packed, group=self.group)
        result, offset = {}, 0
        for name, tensor in tensors.items():
            piece = packed[offset : offset + tensor.numel()]
            result[name] = piece.reshape(tensor.shape).to(tensor.device, tensor.dtype)
            offset += tensor.numel()
        return result

    # -- checking ------------------------------------------------------------------------
    def verify(self, model: nn.Module) -> None:
        """With ``verify=True``: raise :class:`ReplicaDivergenceError` unless all ranks hold the same parameters."""
        if self.verify_after and self.size > 1:
            self.assert_identical(model.named_parameters())

    def assert_identical(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Compare bitwise checksums of the tensors across ranks; name the first that differ.

        A sharded tensor's block is compared with the ranks that hold the same block (its replicas
        on an HSDP mesh); blocks that no other rank holds have nothing to differ from.
        """
        pairs = list(named_tensors)
        keys_and_sums = self._all_gather_ints(
            [shard_key(tensor) for _, tensor in pairs] + [checksum(local(tensor)) for _, tensor in pairs]
        )
        keys, sums = keys_and_sums[:, : len(pairs)], keys_and_sums[:, len(pairs) :]
        differing = [
            name
            for i, (name, _) in enumerate(pairs)
            if any(sums[keys[:, i] == key, i].unique().numel() > 1 for key in keys[:, i].unique())
        ]
        if differing:
            raise ReplicaDivergenceError(
                f"replicas differ after the teleport in {len(differing)} parameter tensor(s): {', '.join(differing[:5])}"
            )

    # -- plumbing ------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if "nccl" in str(dist.get_backend(self.group)).lower():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather_ints(self, values: Sequence[int]) -> Tensor:
        """``values`` of every rank, as a ``(ranks, len(values))`` int64 tensor on the CPU."""
        local = torch.tensor(list(values), dtype=torch.int64, device=self._device())
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local, group=self.group)
        return torch.stack(gathered).cpu()


def checksum(tensor: Tensor) -> int:
    """A position-sensitive checksum of ``tensor``'s bits: equal bits give equal sums.

    The bits are read as integers of the element's width and summed with
    weights ``1, 2, 3, ...`` in int64 (wrapping on overflow).
    """
    flat = tensor.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    bits = flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
    return int((bits * weights).sum())
