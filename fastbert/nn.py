"""Drop-in modules that put fastbert's fused ops into other PyTorch code, and ``patch_hf_bert`` for ``transformers``.

Owns the thin wrappers only: ``FusedLayerNorm`` (state_dict-compatible with ``nn.LayerNorm``),
``FusedSelfAttention`` (the projections of a BERT self-attention around the flash-attention kernel, padded layout
with a right-padded key mask), ``MLMLoss`` (the vocabulary-chunked masked-LM loss), and ``patch_hf_bert`` which
swaps these into a ``transformers`` BERT model in place, sharing its parameters. Which implementation runs (Triton
kernel or torch reference) is decided by ``fastbert.ops`` as everywhere else: CUDA tensors use the kernels,
``FASTBERT_BACKEND`` forces a side. Not covered: cross-attention, decoders with a KV cache, left-padded masks.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastbert import ops
from fastbert.config import IGNORE_INDEX


class FusedLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension through ``ops.residual_layer_norm``; same parameters and state_dict."""

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1:
            raise ValueError(f"FusedLayerNorm normalizes the last dimension only; normalized_shape={shape}")
        self.normalized_shape = shape
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm) -> FusedLayerNorm:
        """A FusedLayerNorm sharing ``norm``'s parameters (not copies: optimizers keep working)."""
        if not norm.elementwise_affine or norm.bias is None or len(norm.normalized_shape) != 1:
            raise ValueError(f"cannot fuse {norm}: needs one normalized dimension with weight and bias")
        fused = cls(norm.normalized_shape, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.residual_layer_norm(x, None, self.weight, self.bias, self.eps)[0]

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[batch, seq]`` True for real keys, from a 2-D 0/1 mask, a 4-D boolean mask (True = attend) or a 4-D
    additive float mask (0 = attend), as ``transformers`` builds them for bidirectional attention."""
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, 0, 0, :]  # bidirectional: every query row carries the same key mask
    if mask.dim() != 2:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} is not [batch, seq] or 4-D")
    if mask.dtype == torch.bool:
        return mask
    if attention_mask.dim() == 4:
        return mask > torch.finfo(mask.dtype).min / 2
    return mask != 0


class FusedSelfAttention(nn.Module):
    """BERT self-attention (``query``, ``key``, ``value`` projections, as in ``transformers``) around the flash
    kernel. ``forward(hidden_states, attention_mask)`` returns ``(context, None)`` like ``BertSelfAttention``."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout_p: float = 0.0,
        projections: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
        self.num_heads, self.head_dim, self.dropout_p = num_heads, hidden_size // num_heads, dropout_p
        if projections is None:
            projections = tuple(nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.query, self.key, self.value = projections

    @classmethod
    def from_hf(cls, attention: nn.Module) -> FusedSelfAttention:
        """Wraps a ``transformers`` BertSelfAttention's own projection layers (shared, not copied)."""
        return cls(
            attention.all_head_size,
            attention.num_attention_heads,
            attention.dropout.p,
            (attention.query, attention.key, attention.value),
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        batch, seq, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(batch, seq, self.num_heads, self.head_dim)
            for proj in (self.query, self.key, self.value)
        )
        keep = key_padding_mask(attention_mask)
        p = self.dropout_p if self.training else 0.0
        out = ops.attention_padded(q, k, v, keep, p)
        return out.reshape(batch, seq, -1), None


class MLMLoss(nn.Module):
    """``(loss, accuracy)`` of the tied decoder over masked rows, through ``ops.mlm_loss``."""

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.mlm_loss(hidden, weight, bias, labels)


def _masked_lm_forward(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    **kwargs,
):
    """BertForMaskedLM.forward with the loss from ``MLMLoss`` on the labelled positions only; with labels, logits
    are not computed (``logits`` is None), which is the memory the fused loss saves."""
    if labels is None:
        return type(self).forward(
            self,
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
    from transformers.modeling_outputs import MaskedLMOutput

    outputs = self.bert(
        input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        return_dict=True,
        **kwargs,
    )
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().flatten()
    hidden = outputs[0].reshape(flat_labels.numel(), -1).index_select(0, rows)
    head = self.cls.predictions
    loss, _accuracy = self.fastbert_mlm_loss(
        head.transform(hidden), head.decoder.weight, head.decoder.bias, flat_labels.index_select(0, rows)
    )
    return MaskedLMOutput(loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def patch_hf_bert(model: nn.Module) -> nn.Module:
    """Swaps, in place, a ``transformers`` BERT model's LayerNorms for ``FusedLayerNorm``, its self-attentions for
    ``FusedSelfAttention`` and, for ``BertForMaskedLM``, its loss for ``MLMLoss``; parameters are shared, so the
    state_dict, tied weights and optimizers are unaffected. Returns the model."""
    from transformers.models.bert import modeling_bert

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, FusedLayerNorm.from_layer_norm(child))
            elif isinstance(child, modeling_bert.BertSelfAttention):
                if child.is_decoder:
                    raise ValueError("patch_hf_bert: decoder self-attention (is_decoder=True) is not supported")
                setattr(parent, name, FusedSelfAttention.from_hf(child))
    if isinstance(model, modeling_bert.BertForMaskedLM):
        model.fastbert_mlm_loss = MLMLoss()
        model.forward = types.MethodType(_masked_lm_forward, model)
    return model
