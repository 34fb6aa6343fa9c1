"""Which core space a teleport keeps: the default, and how a name and ``tau`` become a :class:`NullSpace`.

The null-space method and the coverage table resolve their options here, so
that a table shows the room the teleport it describes would have.
"""

from __future__ import annotations

from .null_space import NullSpace
from .registry import Registry

DEFAULT_NULL_SPACE = "batch_exact"
"""The default core space: the teleport batch's inputs exactly (its loss invariant to rounding, so
the drift limit never binds on a correct projector), a basis sample's directions by energy (99.9 %)
on what the batch does not span, and all the data's by energy where the batch leaves no room (a
batch larger than a layer's inputs). The thresholded core over everything left out directions the
batch itself uses and, on trained models, stopped at the drift limit after gains of x1.000-1.03
(docs/architecture.md, "Which level set"; docs/results.md, section 8)."""


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
