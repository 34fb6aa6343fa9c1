"""Tools to property-test teleport invariance, for this project and for plugin authors.

:func:`assert_teleport_invariant` teleports a copy of a model with the
engine's safety net off (a fixed rate, no drift tolerance, guard or gain
cap) and checks what must hold for any correct projector: every covered
module's outputs on the teleport batch and the batch loss are unchanged
(with the exact null space, ``tau = 1``, unless told otherwise), every
moved site's update annihilates that site's inputs, and the model is left
as found (modes, buffers, hooks). The hypothesis strategies draw small
models and batches from seeds, so every failure replays. Needs the
``test`` extra; ``import torch_teleport`` never imports this package.
"""

from .assertions import (
    DEFAULT_ANNIHILATION,
    DEFAULT_EQUIVALENCE,
    DEFAULT_LR,
    DEFAULT_OUTPUT_RTOL,
    DEFAULT_RTOL,
    DEFAULT_STEPS,
    UNLIMITED,
    assert_structured_matches_full,
    assert_teleport_invariant,
)
from .models import (
    PreNormResidual,
    RecurrentBody,
    SlicedAttention,
    SlicedTransformerLayer,
    TokenClassifier,
)
from .strategies import (
    ACTIVATIONS,
    PADDING_MODES,
    Problem,
    attention_problems,
    conv_problems,
    mlp_problems,
    sequence_problems,
    transformer_problems,
)

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_ANNIHILATION",
    "DEFAULT_EQUIVALENCE",
    "DEFAULT_LR",
    "DEFAULT_OUTPUT_RTOL",
    "DEFAULT_RTOL",
    "DEFAULT_STEPS",
    "PADDING_MODES",
    "UNLIMITED",
    "PreNormResidual",
    "Problem",
    "RecurrentBody",
    "SlicedAttention",
    "SlicedTransformerLayer",
    "TokenClassifier",
    "assert_structured_matches_full",
    "assert_teleport_invariant",
    "attention_problems",
    "conv_problems",
    "mlp_problems",
    "sequence_problems",
    "transformer_problems",
]
