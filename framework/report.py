"""What a teleport did, in plain numbers."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerReport:
    """One site of one module: its input dimension (bias included) and null-space dimension.

    For grouped sites (grouped convolutions) the dimensions add up over groups.
    ``gradient`` is the path its projected gradient took: ``"structured"``
    (first derivatives only) or ``"full"`` (autograd through the objective).
    """

    name: str
    input_dim: int
    null_dim: int
    samples: int
    groups: int = 1
    gradient: str = "full"


@dataclass
class TeleportReport:
    """The outcome of :meth:`Teleporter.teleport`.

    ``stopped`` is one of ``"steps"`` (all steps taken), ``"cap"`` (the
    gradient norm reached the cap), ``"gain"`` (it reached ``max_gain`` times
    its starting value), ``"drift"`` / ``"guard"`` (the last step moved the
    batch loss beyond the drift tolerance / raised the guard batch's loss
    beyond its tolerance, and was undone: the teleport ends at the last good
    step), ``"no_room"`` (no parameter has a non-trivial null space),
    ``"non_finite"`` (rolled back), ``"loss_changed"``
    (the batch loss moved more than the teleporter's ``max_loss_change``; rolled back);
    ``"line_search"`` (no step the search tried improved the objective; level-set
    teleport's own line search too) and, for level-set teleport, ``"kkt"`` (a KKT point reached).
    ``frozen`` maps parameter names to why they did not move; ``step_sizes`` are the
    rates of the steps taken (what the step-length search chose, or the fixed ``lr``).
    ``batch_norm`` says which loss of the batch was kept where the model normalises
    with BatchNorm: ``"train"`` (the batch's own statistics, as training sees it; the
    loss with the running statistics moves), ``"eval"`` (the running statistics) or
    ``"both"`` (the train-mode loss exactly, the eval-mode one by energy); ``None``
    without BatchNorm. ``keeps_batch`` says whether every site's core space held the
    teleport batch's whole span (its loss then moves by rounding only; ``False`` where
    the default null space fell back to the data's core space by energy, the drift
    limit keeping the batch's loss); ``None`` for methods without core spaces. Where
    that fallback stopped on the drift limit with steps left, the teleport went on in the
    room the batch leaves (its loss kept to rounding from there): ``exact_from`` is the
    number of steps taken before (``None``: it did not).
    """

    loss_before: float
    loss_after: float
    grad_norm_before: float
    grad_norm_after: float
    objective_before: float
    objective_after: float
    steps: int
    stopped: str
    rolled_back: bool = False
    layers: list[LayerReport] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    batch_norm: str | None = None
    keeps_batch: bool | None = None
    exact_from: int | None = None
    guard_loss_before: float | None = None
    guard_loss_after: float | None = None
    basis_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def gain(self) -> float:
        """The gradient-norm gain on the teleport batch, after over before (NaN where it started at zero)."""
        return self.grad_norm_after / self.grad_norm_before if self.grad_norm_before > 0 else math.nan

    @property
    def loss_change(self) -> float:
        """Relative change of the teleport-batch loss."""
        return abs(self.loss_after - self.loss_before) / max(abs(self.loss_before), 1e-30)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"teleport: {self.steps} steps ({self.stopped}{', rolled back' if self.rolled_back else ''}), "
            f"loss {self.loss_before:.6g} -> {self.loss_after:.6g}, "
            f"grad norm {self.grad_norm_before:.4g} -> {self.grad_norm_after:.4g}"
        )
