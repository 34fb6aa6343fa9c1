"""Tools to property-test teleport invariance, for this project and for plugin authors.

``assert_teleport_invariant`` teleports a copy of a model and checks what
must hold for any correct projector: the teleport-batch loss is unchanged
(with the exact null space, ``tau = 1``, which both helpers use unless told
otherwise), every moved site's update annihilates that site's inputs,
and the model is left as found (modes, buffers, hooks). The hypothesis
strategies draw small models and batches from seeds, so every failure
replays.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .engine import Teleporter
from .inputs import tensors
from .model_state import double_backward_safe, preserved_state
from .null_space_method import NullSpaceMethod
from .projector import site_view
from .report import TeleportReport

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""Relative loss change allowed after a full teleport at ``tau = 1``."""

DEFAULT_ANNIHILATION = {torch.float64: 1e-11, torch.float32: 1e-5}
"""Allowed ``||dW R|| / (max(||dW||, ||W||) ||R||)`` of a moved site."""


def _exact_unless_given(options: dict) -> dict:
    """``options`` with ``null_space="exact"`` unless they choose a null space or ``tau`` themselves
    (directly or in ``method_options``): the checks hold at ``tau = 1``, not at the Teleporter's
    default thresholded core space."""
    chosen = {**options, **(options.get("method_options") or {})}
    if chosen.get("null_space") is not None or chosen.get("tau") is not None:
        return options
    return {**options, "null_space": "exact"}


def assert_teleport_invariant(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    rtol: float | None = None,
    annihilation_tol: float | None = None,
    steps: int = 4,
    **teleporter_options,
) -> TeleportReport:
    """Teleport a deep copy of ``model`` on ``(inputs, targets)`` and check invariance.

    Checks, with tolerances chosen by the parameters' dtype unless given:

    * the relative change of the batch loss is at most ``rtol``;
    * for every site that moved, ``||[dW | db] R|| <= tol * max(||[dW | db]||, ||[W | b]||) * ||R||``
      with ``R`` the site's representation on the batch (the projector's own);
    * modes, buffers and hook dictionaries of the copy are as they were.

    The teleport uses the exact null space (``null_space="exact"``, ``tau = 1``)
    unless ``teleporter_options`` choose ``null_space`` or ``tau``: the
    Teleporter's default thresholded core space moves the batch loss by design.

    Returns the :class:`TeleportReport` so callers can check more (e.g. that
    the gradient norm grew). ``model`` itself is never modified.
    """
    teleporter_options = _exact_unless_given(teleporter_options)
    subject = copy.deepcopy(model)
    dtype = next(subject.parameters()).dtype
    rtol = DEFAULT_RTOL.get(dtype, 1e-3) if rtol is None else rtol
    annihilation_tol = DEFAULT_ANNIHILATION.get(dtype, 1e-3) if annihilation_tol is None else annihilation_tol
    teleporter = Teleporter(subject, loss_fn, steps=steps, **teleporter_options)
    method = teleporter.method
    assert isinstance(method, NullSpaceMethod), "assert_teleport_invariant checks the null-space method"
    representations = _representations(method, inputs, targets, teleporter)
    before_params = {name: p.detach().clone() for name, p in subject.named_parameters()}
    before_state = _module_state(subject)

    report = teleporter.teleport(inputs, targets)

    assert _module_state(subject) == before_state, "teleport left modes, hooks or buffers changed"
    assert not report.rolled_back, f"teleport rolled back: {report.summary()}"
    assert report.loss_change <= rtol, (
        f"teleport-batch loss changed by {report.loss_change:.3e} (relative) > {rtol:.1e}: {report.summary()}"
    )
    after_params = dict(subject.named_parameters())
    for covered in method.coverage.modules:
        for site in covered.sites:
            if (covered.name, site.name) not in representations:
                continue
            delta = {
                local: after_params[covered.qualified(local)].detach() - before_params[covered.qualified(local)]
                for local in filter(None, (site.weight, site.bias))
            }
            step = site_view(delta[site.weight], site)
            if site.bias is not None:
                step = torch.cat([step, site_view(delta[site.bias], site, bias=True)], dim=-1)
            weight = site_view(before_params[covered.qualified(site.weight)], site)
            representation = representations[(covered.name, site.name)]
            residual = torch.linalg.matrix_norm(step @ representation).max()
            # Relative to the larger of the step and the weight: a step of pure rounding noise
            # (a gradient that lies wholly in the core space) is no failure.
            size = torch.maximum(torch.linalg.matrix_norm(step).max(), torch.linalg.matrix_norm(weight).max())
            scale = size * torch.linalg.matrix_norm(representation).max()
            if scale > 0:
                ratio = float(residual / scale)
                assert ratio <= annihilation_tol, (
                    f"update of {covered.qualified(site.name)} does not annihilate its inputs: "
                    f"||dW R|| / (max(||dW||, ||W||) ||R||) = {ratio:.3e} > {annihilation_tol:.1e}"
                )
    return report


DEFAULT_EQUIVALENCE = 1e-10
"""Allowed relative difference between the structured and the full projected step (float64, tau = 1)."""


def assert_structured_matches_full(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    rtol: float = DEFAULT_EQUIVALENCE,
    path: str = "structured",
    **teleporter_options,
) -> TeleportReport:
    """Check that the structured step equals the projection of the full Hessian-vector product.

    Teleports two deep copies of ``model`` one plain step (``normalize=False``,
    ``lr=1``) on ``(inputs, targets)``, one with ``gradient=path`` (``"structured"``
    or the chain's ``"closed_form"``) and one with ``gradient="full"``, and
    compares every parameter's change:
    ``||d_structured - d_full|| <= rtol * max(||d_full||, tiny)`` parameter by
    parameter. Meant for float64 models at ``tau = 1``, where the two are equal
    in exact arithmetic: the exact null space is used unless ``teleporter_options``
    choose ``null_space`` or ``tau`` (the closed form needs it). Fails if no site
    took the structured path (the check would say nothing). Returns the report of
    the ``path`` run.
    """
    options = {"steps": 1, "lr": 1.0, "normalize": False, **_exact_unless_given(teleporter_options)}
    reports, changes = [], []
    for gradient in (path, "full"):
        subject = copy.deepcopy(model)
        before = {name: p.detach().clone() for name, p in subject.named_parameters()}
        method_options = {**options.pop("method_options", {}), "gradient": gradient}
        report = Teleporter(subject, loss_fn, method_options=method_options, **options).teleport(inputs, targets)
        options["method_options"] = {k: v for k, v in method_options.items() if k != "gradient"}
        assert not report.rolled_back, f"the {gradient} teleport rolled back: {report.summary()}"
        reports.append(report)
        changes.append({name: p.detach() - before[name] for name, p in subject.named_parameters()})
    structured_sites = [layer.name for layer in reports[0].layers if layer.gradient == path]
    assert structured_sites, f"no site took the {path} path: nothing to compare"
    structured, full = changes
    scale = max((float(change.norm()) for change in full.values()), default=0.0)
    for name, reference in full.items():
        difference = float((structured[name] - reference).norm())
        allowed = rtol * max(float(reference.norm()), scale * 1e-3, torch.finfo(reference.dtype).tiny)
        assert difference <= allowed, (
            f"structured step of {name} differs from the projected full Hessian-vector product: "
            f"||difference|| = {difference:.3e} > {allowed:.3e} (||full step|| = {float(reference.norm()):.3e})"
        )
    return reports[0]


def _representations(method: NullSpaceMethod, inputs: Tensor, targets: Tensor, teleporter: Teleporter) -> dict:
    """Every site's representation on the batch, captured through the projectors themselves."""
    # The modes the engine teleports in (BatchNorm keeps its mode), so the inputs match its own.
    with preserved_state(teleporter.model), double_backward_safe(tensors(inputs)[0].device.type):
        captured = method.capture_inputs(inputs)
    return {
        (covered.name, site.name): covered.projector.representation(covered.module, site, captured[(covered.name, site.stream)])
        for covered in method.coverage.modules
        for site in covered.sites
        if captured.get((covered.name, site.stream))
    }


def _module_state(model: nn.Module) -> list:
    return [
        (
            name,
            module.training,
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._backward_hooks),
            tuple((b.detach().cpu().clone().tolist() if b.numel() < 4096 else float(b.double().sum())) for b in module.buffers(recurse=False)),
        )
        for name, module in model.named_modules()
    ]


# -- hypothesis strategies ----------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


@dataclass
class Problem:
    """A model, a batch and a loss, drawn from a seed."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    seed: int

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Problem(seed={self.seed}, model={self.model}, batch={tuple(self.inputs.shape)})"


@st.composite
def mlp_problems(
    draw,
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
    max_depth: int = 4,
    max_width: int = 48,
    max_batch: int = 64,
) -> Problem:
    """Random MLP classification problems: depth, widths, activation, bias, batch and dtype.

    Batches are drawn both smaller and larger than the widths, so some layers
    have a large null space and some none.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(1, max_depth))
    widths = draw(st.lists(st.integers(2, max_width), min_size=depth + 1, max_size=depth + 1))
    classes = draw(st.integers(2, 6))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        dims = [*widths, classes]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        model = nn.Sequential(*layers).to(dtype)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


# -- strategies for convolutions, attention and Transformer layers ------------------------

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@st.composite
def conv_problems(
    draw,
    dims: tuple[int, ...] = (1, 2, 3),
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
    max_batch: int = 2,
) -> Problem:
    """Random small CNN classifiers: a 1x1 stem, a convolution with drawn options, a ``'same'`` one, a head.

    The drawn convolution (``model[1]``) draws its spatial rank, kernel, stride,
    padding (ints, ``'same'``, ``'valid'``), padding mode, dilation, groups
    (depthwise included) and bias; the stem makes it an inner layer (see
    :class:`TokenClassifier`). An optional BatchNorm (training mode) and a
    Dropout check that the teleport keeps their state and turns dropout off.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    spatial = draw(st.sampled_from(dims))
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    channels_in = groups * (1 if depthwise else draw(st.integers(1, 4)))
    channels_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 2) if spatial == 3 else st.integers(2, 3)) for _ in range(spatial))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    padding_kind = draw(st.sampled_from(("int", "same", "valid")))
    if padding_kind == "int":
        padding: tuple[int, ...] | str = tuple(draw(st.integers(0, 2)) for _ in range(spatial))
    else:
        padding = padding_kind
    same = padding_kind == "same"
    stride = tuple(1 if same else draw(st.integers(1, 3)) for _ in range(spatial))
    spans = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    size = tuple(draw(st.integers(max(span, 3), max(span, 3) + 1)) for span in spans)
    batch = draw(st.integers(1, max_batch))
    classes = draw(st.integers(2, 4))
    conv_options = {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": draw(st.sampled_from(PADDING_MODES)),
    }
    second_kernel = draw(st.integers(1, 2))
    batch_norm = draw(st.booleans())
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    dtype = draw(st.sampled_from(dtypes))
    conv_type = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
    norm_type = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial - 1]
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, channels_in, *size, generator=generator, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [
            conv_type(channels_in, channels_in, 1),
            conv_type(channels_in, channels_out, kernel, **conv_options),
        ]
        with torch.no_grad():
            output_size = layers[1].to(dtype)(inputs).shape[2:]
        positions = output_size.numel()
        # Reflect padding needs more elements than it pads (one, for the 'same' padding below).
        second_mode = conv_options["padding_mode"] if min(output_size) > 1 else "zeros"
        if batch_norm and batch * positions > 1:
            layers.append(norm_type(channels_out))
        layers += [
            ACTIVATIONS[activation](),
            conv_type(channels_out, 2, second_kernel, padding="same", padding_mode=second_mode),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(2 * positions, classes),
        ]
        model = nn.Sequential(*layers).to(dtype)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


class SlicedAttention(nn.Module):
    """``nn.MultiheadAttention`` on slices of one input ``(batch, tokens, width)``.

    Queries are the first ``query_len`` tokens (all tokens for self-attention);
    keys and values are the remaining tokens, ``key_width`` and ``value_width``
    features wide. Masks are buffers, so they follow the model's dtype.
    """

    def __init__(
        self,
        attention: nn.MultiheadAttention,
        query_len: int,
        cross: bool,
        call_options: dict,
        masks: dict[str, Tensor],
        unbatched: bool,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.query_len = query_len
        self.cross = cross
        self.call_options = call_options
        self.unbatched = unbatched
        for name, mask in masks.items():
            self.register_buffer(name, mask, persistent=False)
        self.mask_names = sorted(masks)

    def forward(self, x: Tensor) -> Tensor:
        mha = self.attention
        width = mha.embed_dim
        if not self.cross:
            query = key = value = x[..., :width]
        else:
            query = x[:, : self.query_len, :width]
            key = x[:, self.query_len :, : mha.kdim]
            value = key if mha.kdim == mha.vdim == width else x[:, self.query_len :, -mha.vdim :]
        if self.unbatched:
            query, key, value = _same_identity((query, key, value), lambda t: t[0])
        elif not mha.batch_first:
            query, key, value = _same_identity((query, key, value), lambda t: t.transpose(0, 1))
        arguments = {name: getattr(self, name) for name in self.mask_names}
        arguments.update(self.call_options["kwargs"])
        if self.call_options["positional"]:
            call = inspect.signature(mha.forward).bind(query, key, value, **arguments)
            call.apply_defaults()
            output = mha(*call.args)[0]
        else:
            output = mha(query=query, key=key, value=value, **arguments)[0]
        if self.unbatched:
            return output.unsqueeze(0)
        return output if mha.batch_first else output.transpose(0, 1)


def _same_identity(tensors: tuple[Tensor, ...], transform: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """``transform`` each tensor, keeping which of them are the same object (self-attention)."""
    done: dict[int, Tensor] = {}
    return tuple(done.setdefault(id(t), transform(t)) for t in tensors)


class TokenClassifier(nn.Module):
    """Linear embedding, ``body``, mean over the output tokens, linear head.

    The embedding (input width to itself) makes the body an inner layer: a
    network's first layer never moves under the gradient-norm objective, which
    depends on that layer's weights only through its outputs, so its gradient
    lies in the span of its inputs.
    """

    def __init__(self, body: nn.Module, input_width: int, width: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Linear(input_width, input_width)
        self.body = body
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.embed(x)).mean(dim=1))


@st.composite
def attention_problems(
    draw, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32), max_batch: int = 2
) -> Problem:
    """Random ``nn.MultiheadAttention`` classifiers.

    Draws heads, head width, self- or cross-attention, ``kdim``/``vdim``
    (separate projection weights), ``batch_first``, biases, ``add_bias_kv``,
    ``add_zero_attn``, unbatched calls, positional or keyword arguments,
    ``need_weights`` and masks: boolean or float key-padding masks, 2-d, 3-d
    or causal attention masks. Every query keeps at least one key.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    heads = draw(st.integers(1, 3))
    width = heads * draw(st.integers(1, 3))
    cross = draw(st.booleans())
    separate = cross and draw(st.booleans())
    key_width = draw(st.integers(1, 4)) if separate else width
    value_width = draw(st.integers(1, 4)) if separate else width
    batch = draw(st.integers(1, max_batch))
    query_len = draw(st.integers(1, 4))
    key_len = draw(st.integers(1, 4)) if cross else query_len
    unbatched = batch == 1 and draw(st.booleans())
    batch_first = draw(st.booleans())
    mask_dtype = draw(st.sampled_from(("none", "bool", "float")))
    attn_mask_kind = "none" if mask_dtype == "none" else draw(st.sampled_from(("none", "2d", "3d", "causal")))
    if attn_mask_kind == "causal" and cross:
        attn_mask_kind = "2d"
    key_padding = mask_dtype != "none" and draw(st.booleans())
    call_options = {
        "positional": draw(st.booleans()),
        "kwargs": {"need_weights": draw(st.booleans()), "average_attn_weights": draw(st.booleans())},
    }
    module_options = {
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "batch_first": batch_first,
    }
    dtype = draw(st.sampled_from(dtypes))
    classes = draw(st.integers(2, 4))
    generator = torch.Generator().manual_seed(seed)
    masks = _attention_masks(
        generator, mask_dtype, attn_mask_kind, key_padding, batch, heads, query_len, key_len, unbatched
    )
    if attn_mask_kind == "causal":
        call_options["kwargs"]["is_causal"] = True
    tokens = query_len + key_len if cross else query_len
    input_width = max(width, key_width + value_width)
    inputs = torch.randn(batch, tokens, input_width, generator=generator, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        attention = nn.MultiheadAttention(
            width, heads, dropout=0.3, kdim=key_width, vdim=value_width, **module_options
        )
        body = SlicedAttention(attention, query_len, cross, call_options, masks, unbatched)
        model = TokenClassifier(body, input_width, width, classes).to(dtype)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


def _attention_masks(
    generator, mask_dtype, attn_mask_kind, key_padding, batch, heads, query_len, key_len, unbatched
) -> dict[str, Tensor]:
    """Masks of the drawn kinds; key 0 is never masked, so no query loses every key."""
    masks: dict[str, Tensor] = {}

    def blocked(*shape: int) -> Tensor:
        mask = torch.rand(*shape, generator=generator) < 0.4
        mask[..., 0] = False
        return mask

    def as_dtype(mask: Tensor) -> Tensor:
        if mask_dtype == "bool":
            return mask
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))

    if key_padding:
        masks["key_padding_mask"] = as_dtype(blocked(key_len) if unbatched else blocked(batch, key_len))
    if attn_mask_kind == "causal":
        masks["attn_mask"] = as_dtype(torch.ones(query_len, key_len, dtype=torch.bool).triu(1))
    elif attn_mask_kind != "none":
        leading = () if attn_mask_kind == "2d" else ((heads,) if unbatched else (batch * heads,))
        shape = (*leading, query_len, key_len)
        if mask_dtype == "float":
            scores = torch.randn(shape, generator=generator, dtype=torch.float64)
            masks["attn_mask"] = scores.masked_fill(blocked(*shape), float("-inf"))
        else:
            masks["attn_mask"] = blocked(*shape)
    return masks


class SlicedTransformerLayer(nn.Module):
    """A Transformer encoder (stack) or decoder layer on one input ``(batch, tokens, d_model)``.

    The encoder reads every token; the decoder's target is the first
    ``target_len`` tokens and its memory the rest.
    """

    def __init__(self, layer: nn.Module, target_len: int, masks: dict[str, Tensor], call_options: dict) -> None:
        super().__init__()
        self.layer = layer
        self.target_len = target_len
        self.call_options = call_options
        for name, mask in masks.items():
            self.register_buffer(name, mask, persistent=False)
        self.mask_names = sorted(masks)

    def forward(self, x: Tensor) -> Tensor:
        masks = {name: getattr(self, name) for name in self.mask_names}
        batch_first = self.call_options["batch_first"]
        if not batch_first:
            x = x.transpose(0, 1)
        if isinstance(self.layer, nn.TransformerDecoderLayer):
            split = (slice(None, self.target_len), slice(self.target_len, None))
            target, memory = (x[:, part] if batch_first else x[part] for part in split)
            output = self.layer(target, memory, **masks, **self.call_options["kwargs"])
        else:
            output = self.layer(x, **masks, **self.call_options["kwargs"])
        return output if batch_first else output.transpose(0, 1)


@st.composite
def transformer_problems(
    draw, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32), max_batch: int = 2
) -> Problem:
    """Random ``nn.TransformerEncoder``/``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` classifiers.

    Draws heads, head width, feed-forward width, activation, pre- or post-norm,
    ``batch_first``, biases, dropout (must be off during teleport), causal
    masks and key-padding masks.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(("encoder_layer", "encoder", "decoder_layer")))
    heads = draw(st.integers(1, 2))
    width = heads * draw(st.integers(1, 3))
    batch = draw(st.integers(1, max_batch))
    target_len = draw(st.integers(1, 3))
    memory_len = draw(st.integers(1, 3)) if kind == "decoder_layer" else 0
    batch_first = draw(st.booleans())
    causal = draw(st.booleans())
    key_padding = draw(st.booleans())
    layer_options = {
        "dim_feedforward": draw(st.integers(2, 6)),
        "dropout": 0.2,
        "activation": draw(st.sampled_from(("relu", "gelu"))),
        "norm_first": draw(st.booleans()),
        "batch_first": batch_first,
        "bias": draw(st.booleans()),
    }
    dtype = draw(st.sampled_from(dtypes))
    classes = draw(st.integers(2, 4))
    generator = torch.Generator().manual_seed(seed)
    mask_name, padding_name, causal_name = {
        "encoder_layer": ("src_mask", "src_key_padding_mask", "is_causal"),
        "encoder": ("mask", "src_key_padding_mask", "is_causal"),
        "decoder_layer": ("tgt_mask", "memory_key_padding_mask", "tgt_is_causal"),
    }[kind]
    masks: dict[str, Tensor] = {}
    kwargs: dict = {}
    if causal:
        masks[mask_name] = nn.Transformer.generate_square_subsequent_mask(target_len, dtype=torch.float64)
        kwargs[causal_name] = True
    if key_padding:
        padded = torch.rand(batch, memory_len or target_len, generator=generator) < 0.4
        padded[:, 0] = False
        masks[padding_name] = torch.zeros(padded.shape, dtype=torch.float64).masked_fill(padded, float("-inf"))
    inputs = torch.randn(batch, target_len + memory_len, width, generator=generator, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "decoder_layer":
            layer: nn.Module = nn.TransformerDecoderLayer(width, heads, **layer_options)
        else:
            layer = nn.TransformerEncoderLayer(width, heads, **layer_options)
            if kind == "encoder":
                layer = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        body = SlicedTransformerLayer(layer, target_len, masks, {"batch_first": batch_first, "kwargs": kwargs})
        model = TokenClassifier(body, width, width, classes).to(dtype)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


class RecurrentBody(nn.Module):
    """A recurrent layer on ``(batch, time, features)``, returning its outputs ``(batch, time, width)``.

    Optionally with a fixed initial state (a buffer), packed sequences of the
    given ``lengths``, time-first layout, or unbatched calls (batch of one).
    """

    def __init__(self, rnn: nn.RNNBase, initial: Tensor | None, lengths: Tensor | None, unbatched: bool) -> None:
        super().__init__()
        self.rnn = rnn
        self.unbatched = unbatched
        self.register_buffer("initial", initial, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rnn = self.rnn
        hx = self.initial
        if hx is not None and rnn.mode == "LSTM":
            width = rnn.proj_size or rnn.hidden_size
            hx = (hx[..., :width], hx)
        if self.unbatched:
            if hx is not None:
                hx = _same_identity(hx, lambda t: t[:, 0]) if isinstance(hx, tuple) else hx[:, 0]
            return rnn(x[0], hx)[0].unsqueeze(0)
        sequence = x if rnn.batch_first else x.transpose(0, 1)
        if self.lengths is not None:
            sequence = nn.utils.rnn.pack_padded_sequence(
                sequence, self.lengths, batch_first=rnn.batch_first, enforce_sorted=False
            )
        output = rnn(sequence, hx)[0]
        if self.lengths is not None:
            output = nn.utils.rnn.pad_packed_sequence(output, batch_first=rnn.batch_first)[0]
        return output if rnn.batch_first else output.transpose(0, 1)


@st.composite
def sequence_problems(
    draw, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32), max_batch: int = 2
) -> Problem:
    """Random ``nn.RNN``/``nn.LSTM``/``nn.GRU`` classifiers.

    Draws the kind (and RNN nonlinearity), layers, bidirectionality,
    ``batch_first``, bias, LSTM ``proj_size``, a given or zero initial state,
    packed variable-length sequences and unbatched calls.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(("RNN_TANH", "RNN_RELU", "LSTM", "GRU")))
    features, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    layers = draw(st.integers(1, 2))
    options = {
        "num_layers": layers,
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bidirectional": draw(st.booleans()),
        "dropout": 0.3 if layers > 1 else 0.0,  # between layers: must be off during teleport
    }
    proj_size = draw(st.integers(0, hidden - 1)) if kind == "LSTM" else 0
    batch, time = draw(st.integers(1, max_batch)), draw(st.integers(1, 4))
    unbatched = batch == 1 and draw(st.booleans())
    packed = not unbatched and draw(st.booleans())
    given_state = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    directions = 2 if options["bidirectional"] else 1
    initial = None
    if given_state:
        initial = torch.randn(options["num_layers"] * directions, batch, hidden, generator=generator)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator) if packed else None
    if lengths is not None:
        lengths[0] = time  # the padded output keeps all time steps
    inputs = torch.randn(batch, time, features, generator=generator, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "LSTM":
            rnn: nn.RNNBase = nn.LSTM(features, hidden, proj_size=proj_size, **options)
        elif kind == "GRU":
            rnn = nn.GRU(features, hidden, **options)
        else:
            rnn = nn.RNN(features, hidden, nonlinearity=kind[4:].lower(), **options)
        width = (proj_size or hidden) * directions
        model = TokenClassifier(RecurrentBody(rnn, initial, lengths, unbatched), features, width, 3).to(dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)


class PreNormResidual(nn.Module):
    """``x + block(norm(x))``, the way Mamba and pre-norm Transformer stacks use their blocks."""

    def __init__(self, block: nn.Module, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(self.norm(x))
