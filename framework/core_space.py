"""Which core space a teleport keeps: the default, and how a name and ``tau`` become a :class:`NullSpace`.

The null-space method and the coverage table resolve their options here, so
that a table shows the room the teleport it describes would have.
"""

from __future__ import annotations

from .null_space import NullSpace
from .registry import Registry

DEFAULT_NULL_SPACE = "batch_exact"
"""The default core space: the leading directions holding 99.9% of the energy of the inputs of
the teleport batch, the basis sample and the guard batch (GPM's reading of tau). An exact null
space keeps only the batch's loss (a round of teleports on batches of 32 raised the whole
training set's loss by 6% on digits) and has no room at all on a sample larger than a layer's
width; this one keeps the data's loss to 0.01% on a sample of 1,024 while the drift tolerance
keeps the batch's (docs/architecture.md, "Which level set")."""


def resolve_null_space(null_space: str | NullSpace, tau: float | None, registry: Registry) -> NullSpace:
    """The null space ``null_space`` names (an instance is taken as it is).

    Without ``tau`` the null space takes its own default (``svd``: 0.999, ``exact``: 1).
    """
    if isinstance(null_space, NullSpace):
        if tau is not None:
            raise ValueError("give tau to the null space object itself, not beside it")
        return null_space
    null_space_class = registry.get("null_space", null_space)
    return null_space_class() if tau is None else null_space_class(tau=tau)
