"""The attention projector: ``out_proj`` sees the true concatenated heads, and teleports through
``nn.MultiheadAttention``, plain-Linear attention and Transformer layers keep the batch loss."""

import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from torch import Tensor, nn

from torch_teleport import Teleporter
from torch_teleport.projectors.attention import BIAS_V_REASON, MultiheadAttentionProjector
from torch_teleport.projectors.frozen import NormalizationPolicy
from torch_teleport.testing import (
    TokenClassifier,
    assert_teleport_invariant,
    attention_problems,
    transformer_problems,
)


def reference_heads(
    mha: nn.MultiheadAttention, query, key, value, key_padding_mask, attn_mask, causal_hint: bool
) -> Tensor:
    """Concatenated heads ``(batch, queries, embed_dim)`` computed from the definition (eqs. 6-7).

    Inputs are batch-first and batched; masks as ``nn.MultiheadAttention`` takes them.
    With ``causal_hint`` (``is_causal=True`` without a key-padding mask or attention
    weights), PyTorch masks all keys causally instead, the ``bias_k`` and zero keys included.
    """
    embed, heads = mha.embed_dim, mha.num_heads
    batch, queries = query.shape[0], query.shape[1]
    if mha.in_proj_weight is not None:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (0, 0, 0)
    q, k, v = query @ w_q.T + b_q, key @ w_k.T + b_k, value @ w_v.T + b_v

    def additive(mask: Tensor) -> Tensor:
        return (
            torch.zeros(mask.shape, dtype=q.dtype).masked_fill(mask, -math.inf)
            if mask.dtype == torch.bool
            else mask
        )

    scores_mask = torch.zeros(batch, heads, queries, key.shape[1], dtype=q.dtype)
    if attn_mask is not None:
        scores_mask = scores_mask + additive(
            attn_mask.reshape(-1, heads, *attn_mask.shape[-2:])
            if attn_mask.dim() == 3
            else attn_mask
        )
    if key_padding_mask is not None:
        scores_mask = scores_mask + additive(key_padding_mask[:, None, None, :])
    extra = []
    if mha.bias_k is not None:
        extra.append((mha.bias_k.expand(batch, 1, embed), mha.bias_v.expand(batch, 1, embed)))
    if mha.add_zero_attn:
        extra.append((torch.zeros(batch, 1, embed, dtype=q.dtype),) * 2)
    for extra_k, extra_v in extra:  # extra keys, unmasked
        k, v = torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)
        scores_mask = F.pad(scores_mask, (0, 1))
    if causal_hint:
        scores_mask = additive(torch.ones(queries, k.shape[1], dtype=torch.bool).triu(1)).expand_as(
            scores_mask
        )
    split = lambda t: t.reshape(batch, -1, heads, embed // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(embed // heads)
    weights = torch.softmax(scores + scores_mask, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, queries, embed)


@given(attention_problems(dtypes=(torch.float64,)))
def test_out_proj_representation_is_the_true_input_of_out_proj(problem):
    body = problem.model.body.eval()  # dropout off, as in every teleport forward
    mha = body.attention
    projector = MultiheadAttentionProjector()
    captured = defaultdict(list)
    handles = projector.capture(mha, lambda stream, tensor: captured[stream].append(tensor))
    try:
        with torch.no_grad():
            output = body(problem.model.embed(problem.inputs))
    finally:
        for handle in handles:
            handle.remove()
    query, key, value = (captured[stream][0] for stream in ("query", "key", "value"))
    if body.unbatched:
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))
    elif not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    key_padding_mask = getattr(body, "key_padding_mask", None)
    if key_padding_mask is not None and body.unbatched:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    with torch.no_grad():
        options = body.call_options["kwargs"]
        causal_hint = (
            options.get("is_causal", False)
            and key_padding_mask is None
            and not options["need_weights"]
        )
        attn_mask = getattr(body, "attn_mask", None)
        expected = reference_heads(mha, query, key, value, key_padding_mask, attn_mask, causal_hint)
        # The reference is the input of out_proj: it reproduces the module's output.
        torch.testing.assert_close(mha.out_proj(expected), output, rtol=1e-12, atol=1e-12)
    out_site = next(site for site in projector.sites(mha) if site.name == "out_proj")
    representation = projector.representation(mha, out_site, captured["heads"])
    heads = representation[0, : mha.embed_dim].T  # tokens in (query position, batch) order
    torch.testing.assert_close(
        heads, expected.transpose(0, 1).reshape(-1, mha.embed_dim), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_plain_and_causal_attention_record_the_true_heads_and_give_the_modules_output(batch_first, causal):
    """Plain attention (and a causal mask given with the ``is_causal`` hint, as Transformer layers
    pass it) is computed without identity projections: the recorded heads are the definition's and
    ``out_proj`` of them is the module's own output, with or without the capture."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    tokens = torch.randn(3, 5, 8, dtype=torch.float64)  # (batch, tokens, width)
    layout = tokens if batch_first else tokens.transpose(0, 1)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64) if causal else None
    with torch.no_grad():
        native = mha(layout, layout, layout, attn_mask=mask, is_causal=causal, need_weights=False)[0]
    captured = defaultdict(list)
    handles = MultiheadAttentionProjector().capture(mha, lambda stream, tensor: captured[stream].append(tensor))
    try:
        with torch.no_grad():
            output = mha(layout, layout, layout, attn_mask=mask, is_causal=causal, need_weights=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(output, native, rtol=1e-12, atol=1e-12)
    expected = reference_heads(mha, tokens, tokens, tokens, None, mask, causal)
    heads = captured["heads"][0].transpose(0, 1)  # (batch, tokens, width)
    torch.testing.assert_close(heads, expected, rtol=1e-12, atol=1e-12)


@given(attention_problems())
def test_multihead_attention_teleport_keeps_the_batch_loss(problem):
    assert_teleport_invariant(problem.model, problem.loss_fn, problem.inputs, problem.targets)


@given(transformer_problems())
def test_transformer_layers_teleport_keeps_the_batch_loss(problem):
    report = assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets
    )
    norms = [name for name in report.frozen if ".norm" in name]
    assert norms and all(report.frozen[name] == NormalizationPolicy.reason for name in norms)


def _cross_attention(width=4, heads=2, **options) -> TokenClassifier:
    """One query token attending to the other tokens (after the classifier's embedding)."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True, **options)

        def forward(self, x):
            return self.attention(x[:, :1], x[:, 1:], x[:, 1:], need_weights=False)[0]

    return TokenClassifier(Cross(), width, width, 3).double()


def test_query_block_moves_while_key_and_value_blocks_without_room_stay_bit_identical():
    torch.manual_seed(0)
    model = _cross_attention()
    inputs, targets = torch.randn(1, 9, 4, dtype=torch.float64), torch.tensor([2])
    packed = model.body.attention.in_proj_weight
    before = packed.detach().clone()
    report = Teleporter(model, F.cross_entropy, steps=4, null_space="exact").teleport(inputs, targets)
    null = {layer.name: layer.null_dim for layer in report.layers}
    assert (
        null["body.attention.q"] > 0 and null["body.attention.k"] == null["body.attention.v"] == 0
    )
    assert report.loss_change <= 1e-10
    assert not torch.equal(packed[:4], before[:4])
    assert torch.equal(packed[4:], before[4:])


def test_bias_k_moves_in_the_complement_of_the_queries_and_bias_v_is_frozen():
    torch.manual_seed(0)
    model = _cross_attention(width=6, heads=2, add_bias_kv=True)
    inputs, targets = torch.randn(1, 3, 6, dtype=torch.float64), torch.tensor([0])
    report = assert_teleport_invariant(model, F.cross_entropy, inputs, targets)
    null = {layer.name: layer.null_dim for layer in report.layers}
    assert null["body.attention.bias_k"] == 2 * (3 - 1)  # per head: 3 dims, one query token
    assert report.frozen["body.attention.bias_v"] == BIAS_V_REASON


class LinearAttention(nn.Module):
    """Multi-head self-attention written with plain ``nn.Linear`` q/k/v/o layers."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        heads = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(heads.transpose(1, 2).flatten(-2))


@given(attention_problems(dtypes=(torch.float64, torch.float32), max_batch=1))
def test_attention_of_plain_linear_layers_teleports_through_the_linear_projector(problem):
    width = problem.model.body.attention.embed_dim
    torch.manual_seed(problem.seed)
    model = TokenClassifier(
        LinearAttention(width, problem.model.body.attention.num_heads), width, width, 3
    )
    model = model.to(problem.inputs.dtype)
    inputs = problem.inputs[..., :width]
    report = assert_teleport_invariant(model, F.cross_entropy, inputs, problem.targets % 3)
    assert {layer.name for layer in report.layers} >= {f"body.{n}.weight" for n in "qkvo"}


def _grad_norm_growth(model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    report = Teleporter(model, F.cross_entropy, steps=8, null_space="exact").teleport(inputs, targets)
    assert report.loss_change <= 1e-10, report.summary()
    return report.gain


def test_gradient_norm_grows_through_multihead_attention():
    torch.manual_seed(0)
    model = TokenClassifier(nn.Sequential(nn.Linear(3, 8), LinearAttention(8, 2)), 3, 8, 3).double()
    mha_model = _cross_attention(width=8, heads=2)
    assert (
        _grad_norm_growth(mha_model, torch.randn(1, 4, 8, dtype=torch.float64), torch.tensor([1]))
        > 1.05
    )
    assert (
        _grad_norm_growth(model, torch.randn(1, 4, 3, dtype=torch.float64), torch.tensor([1]))
        > 1.05
    )


class TargetAndMemory(nn.Module):
    """A decoder layer whose target is the first two tokens and whose memory is the rest."""

    def __init__(self, layer: nn.TransformerDecoderLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x[:, :2], x[:, 2:])


def test_gradient_norm_grows_through_transformer_encoder_and_decoder_layers():
    torch.manual_seed(0)
    for body in (
        nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
        TargetAndMemory(nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, batch_first=True)),
    ):
        model = TokenClassifier(body, 8, 8, 3).double()
        assert (
            _grad_norm_growth(model, torch.randn(1, 4, 8, dtype=torch.float64), torch.tensor([1]))
            > 1.05
        )
