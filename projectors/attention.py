"""Projector for ``nn.MultiheadAttention``: the self-attention case of eqs. 10 and 13.

Attention is four affine maps of tokens: queries, keys and values are
projections of the query, key and value inputs (eq. 7), and ``out_proj`` maps
the concatenated heads to the output (eq. 6). Each is a site whose samples
are tokens. Moving each within the null space of its own inputs keeps the
queries, keys and values on the batch, hence the heads and the output.

``out_proj`` runs inside ``F.multi_head_attention_forward``, so no hook on it
ever fires. While a capture is installed the module computes its result from
its four maps as explicit tensors instead (:func:`decomposed_attention`): the
projections, then the attention between them (the same kernel call as the
module's own for plain attention; otherwise the same functional call with
identity projections, so that masks and extra keys act exactly as in it), then
``out_proj`` of the concatenated heads, with dropout off (teleport forwards run
in eval mode).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from torch_teleport import Projector, Site, hookimpl
from torch_teleport.projector import Record, append_ones

BIAS_V_REASON = (
    "bias_v is the value of an extra key that every query attends to with positive weight, "
    "so any change to it changes the output: no null space"
)


class MultiheadAttentionProjector(Projector):
    """Sites ``q``, ``k``, ``v`` (rows of the packed or separate in-projections), ``out_proj``
    and, with ``add_bias_kv``, ``bias_k``.

    ``bias_k`` is the key of an extra token: it enters each head's scores as
    ``q_h . bias_k_h``, a linear map of the projected queries, so it moves in
    the complement of the batch's projected queries, head by head (room exists
    when a batch has fewer query tokens than a head has dimensions). ``bias_v``
    is frozen (:data:`BIAS_V_REASON`).
    """

    def sites(self, module: nn.MultiheadAttention) -> Sequence[Site]:
        embed = module.embed_dim
        bias = "in_proj_bias" if module.in_proj_bias is not None else None
        blocks = {"q": (0, embed), "k": (embed, 2 * embed), "v": (2 * embed, 3 * embed)}
        streams = {"q": "query", "k": "key", "v": "value"}
        if module.in_proj_weight is not None:
            sites = [
                Site(n, streams[n], "in_proj_weight", bias, rows=rows) for n, rows in blocks.items()
            ]
        else:
            sites = [
                Site(n, streams[n], f"{n}_proj_weight", bias, bias_rows=rows)
                for n, rows in blocks.items()
            ]
        out_bias = "out_proj.bias" if module.out_proj.bias is not None else None
        sites.append(Site("out_proj", "heads", "out_proj.weight", out_bias))
        if module.bias_k is not None:
            sites.append(Site("bias_k", "projected_query", "bias_k"))
        return sites

    def frozen(self, module: nn.MultiheadAttention) -> dict[str, str]:
        return {"bias_v": BIAS_V_REASON} if module.bias_v is not None else {}

    def capture(self, module: nn.MultiheadAttention, record: Record) -> list[_DecomposedForward]:
        """The query, key and value inputs, and ``out_proj``'s: the concatenated heads. While the
        handle is installed the module computes its result by :func:`decomposed_attention`, which
        yields the heads on the way (one attention per call, not a second one for the record)."""

        def streams(arguments: dict[str, Any], maps: dict[str, Tensor], heads: Tensor) -> None:
            for stream in ("query", "key", "value"):
                record(stream, arguments[stream])
            record("heads", heads)
            if module.bias_k is not None:
                record("projected_query", maps["q"])

        return [_DecomposedForward(module, streams)]

    def capture_outputs(self, module: nn.MultiheadAttention, record: Record) -> list[_DecomposedForward]:
        """The outputs of ``q``, ``k``, ``v`` and ``out_proj``: while the hooks are installed the
        module computes its result with the four maps as explicit tensors
        (:func:`decomposed_attention`), so gradients reach them; the fused call does not run at
        all. ``bias_k`` records nothing and takes the full path."""

        def outputs(arguments: dict[str, Any], maps: dict[str, Tensor], heads: Tensor) -> None:
            for site, tensor in maps.items():
                record(site, tensor)

        return [_DecomposedForward(module, outputs)]

    def output_representation(
        self, module: nn.MultiheadAttention, site: Site, outputs: Sequence[Tensor]
    ) -> Tensor:
        tokens = torch.cat([y.reshape(-1, module.embed_dim) for y in outputs])
        return tokens.T.unsqueeze(0)

    def representation(
        self, module: nn.MultiheadAttention, site: Site, captured: Sequence[Tensor]
    ) -> Tensor:
        if site.name == "bias_k":
            queries = torch.cat([q.reshape(-1, module.embed_dim) for q in captured])
            return _per_head_columns(queries, module.num_heads)
        width = module.get_parameter(site.weight).shape[1]
        tokens = torch.cat([x.reshape(-1, width) for x in captured])
        if site.bias is not None:
            tokens = append_ones(tokens)
        return tokens.T.unsqueeze(0)


class _DecomposedForward:
    """Replaces one module's ``forward`` by :func:`decomposed_attention` until :meth:`remove`, handing
    each call's bound arguments, four maps and concatenated heads to ``seen``.

    Hooks registered on the module still run around it (``nn.Module.__call__`` calls
    ``self.forward``); removing the handle restores the class's ``forward``.
    """

    def __init__(self, module: nn.MultiheadAttention, seen: Callable[[dict[str, Any], dict[str, Tensor], Tensor], None]) -> None:
        self.module = module
        signature = inspect.signature(module.forward)

        def forward(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
            call = signature.bind(*args, **kwargs)
            call.apply_defaults()
            result, maps, heads = decomposed_attention(module, call.arguments)
            seen(call.arguments, maps, heads)
            return result

        forward.__signature__ = signature  # code that inspects module.forward sees the real one
        module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def decomposed_attention(
    module: nn.MultiheadAttention, arguments: dict[str, Any]
) -> tuple[tuple[Tensor, Tensor | None], dict[str, Tensor], Tensor]:
    """The module's ``(output, weights)`` for one call, with its four affine maps as tensors, and the
    concatenated heads (``out_proj``'s input, ``(target tokens, [batch,] embed_dim)``).

    ``arguments`` are the call's bound arguments. The projections ``q``, ``k``, ``v`` (laid out
    like the query, key and value inputs) and the output projection (laid out like the heads) are
    computed explicitly, so gradients reach each of them.
    """
    maps, heads, attention = _attend(module, arguments)
    maps["out_proj"] = output = F.linear(heads, module.out_proj.weight, module.out_proj.bias)
    batch_first = module.batch_first and arguments["query"].dim() == 3
    return (output.transpose(0, 1) if batch_first else output, attention), maps, heads


def _attend(
    module: nn.MultiheadAttention, arguments: dict[str, Any]
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """The projections ``q``, ``k``, ``v``, the concatenated heads and the attention weights of one call.

    The attention between the projections is the module's own functional call
    with identity projections and no dropout, so masks, ``bias_kv``,
    ``add_zero_attn`` and ``is_causal`` act exactly as in the call.
    """
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    embed = module.embed_dim
    packed = module.in_proj_weight
    weights = (
        packed.split(embed) if packed is not None
        else (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    )  # fmt: skip
    biases = module.in_proj_bias.split(embed) if module.in_proj_bias is not None else (None,) * 3
    maps = {
        name: F.linear(x, weight, bias)
        for name, x, weight, bias in zip("qkv", (query, key, value), weights, biases, strict=True)
    }
    q, k, v = maps["q"], maps["k"], maps["v"]
    if module.batch_first and query.dim() == 3:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    if _plain(module, arguments, q):
        return maps, _scaled_dot_product_heads(q, k, v, module.num_heads, bool(arguments["is_causal"])), None
    identity = torch.eye(embed, dtype=q.dtype, device=q.device)
    heads, attention = F.multi_head_attention_forward(
        q,
        k,
        v,
        embed,
        module.num_heads,
        None,
        None,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        0.0,
        identity,
        None,
        training=False,
        key_padding_mask=arguments["key_padding_mask"],
        need_weights=arguments["need_weights"],
        attn_mask=arguments["attn_mask"],
        use_separate_proj_weight=True,
        q_proj_weight=identity,
        k_proj_weight=identity,
        v_proj_weight=identity,
        average_attn_weights=arguments["average_attn_weights"],
        is_causal=arguments["is_causal"],
    )
    return maps, heads, attention


def _plain(module: nn.MultiheadAttention, arguments: dict[str, Any], q: Tensor) -> bool:
    """Whether the call is plain scaled dot-product attention over batched projections: no extra
    keys, no key-padding mask, no weights asked for, and either no attention mask or a causal one
    given with the ``is_causal`` hint (which ``F.multi_head_attention_forward`` then hands to the
    kernel as the hint alone)."""
    causal = bool(arguments["is_causal"])
    return (
        q.dim() == 3
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
        and arguments["key_padding_mask"] is None
        and not arguments["need_weights"]
        and (arguments["attn_mask"] is not None) == causal
    )


def _scaled_dot_product_heads(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool) -> Tensor:
    """The concatenated heads ``(target tokens, batch, embed_dim)`` of sequence-first projections, by the
    same kernel call and layouts as ``F.multi_head_attention_forward`` (without its identity in- and
    out-projections: four products less per call)."""
    targets, batch, embed = q.shape
    width = embed // heads

    def split(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], batch * heads, width).transpose(0, 1).reshape(batch, heads, x.shape[0], width)

    output = F.scaled_dot_product_attention(split(q), split(k), split(v), None, 0.0, causal)
    return output.permute(2, 0, 1, 3).reshape(targets, batch, embed)


def _per_head_columns(queries: Tensor, heads: int) -> Tensor:
    """``(1, embed_dim, tokens * heads)``: each query token once per head, zero outside that head.

    ``bias_k . column`` is then the score of the extra key for that token and head.
    """
    per_head = rearrange(queries, "t (h d) -> t h d", h=heads)
    eye = torch.eye(heads, dtype=queries.dtype, device=queries.device)
    blocks = torch.einsum("thd,hg->gthd", per_head, eye)
    return rearrange(blocks, "g t h d -> (h d) (g t)").unsqueeze(0)


@hookimpl
def teleport_register_projectors(registry) -> None:
    registry.add_projector(nn.MultiheadAttention, MultiheadAttentionProjector)
