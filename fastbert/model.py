"""The BERT model: embeddings, encoder, pooler and the task heads.

The encoder always runs on the unpadded layout: a flat ``[total_tokens, hidden]`` tensor with ``cu_seqlens``
marking where each sequence starts. A padded batch (``input_ids [B, S]`` with ``attention_mask``) is unpadded once
before the embeddings and padded again at the output, as MosaicBERT does, so padding costs nothing in the linear
layers. The compute-heavy steps go through ``fastbert.ops`` (attention, residual + LayerNorm, bias + GELU, MLM
loss); this file is the model's structure and nothing else. Loading and saving HF checkpoints lives in
``fastbert.hf``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.config import IGNORE_INDEX, BertConfig


# Layout ---------------------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Where the real tokens of a batch sit.

    ``cu_seqlens`` (int32 ``[B + 1]``) and ``max_seqlen`` describe the unpadded batch. For a padded input,
    ``index`` holds each real token's position in the flattened ``[B * S]`` input and ``shape`` is ``(B, S)``.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor | None = None
    shape: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Layout:
        mask = attention_mask.bool()
        seqlens = mask.sum(dim=1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        index = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        return cls(cu_seqlens, int(seqlens.max()) if seqlens.numel() else 0, index, tuple(mask.shape))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> Layout:
        cu_seqlens = cu_seqlens.to(torch.int32)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
        return cls(cu_seqlens, max_seqlen)

    def to(self, device: torch.device, non_blocking: bool = False) -> Layout:
        """The layout with its tensors on ``device``: built on the host from the collated mask, it spares the device
        the host syncs of unpadding there (a ``nonzero`` and a ``max``)."""
        index = None if self.index is None else self.index.to(device, non_blocking=non_blocking)
        return Layout(self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen, index, self.shape)

    def pin_memory(self) -> Layout:
        index = None if self.index is None else self.index.pin_memory()
        return Layout(self.cu_seqlens.pin_memory(), self.max_seqlen, index, self.shape)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, ...]`` -> ``[total_tokens, ...]`` (identity for an unpadded batch)."""
        if self.index is None:
            return x
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[total_tokens, ...]`` -> ``[B, S, ...]`` with ``fill`` at padding (identity for an unpadded batch)."""
        if self.index is None:
            return x
        batch, seq = self.shape
        out = x.new_full((batch * seq, *x.shape[1:]), fill)
        return out.index_copy(0, self.index, x).view(batch, seq, *x.shape[1:])

    def encoder_inputs(self, flat_ids: torch.Tensor) -> tuple:
        """``(input_ids, attention_mask, cu_seqlens, max_seqlen)`` that give ``BertModel.encode`` this layout again
        for new ``flat_ids [total_tokens]``: padded to ``[B, S]`` with the layout as the mask, or flat with the
        sequence bounds."""
        if self.index is None:
            return flat_ids, None, self.cu_seqlens, self.max_seqlen
        return self.pad(flat_ids), self, None, None

    def positions(self, total: int) -> torch.Tensor:
        """Position ids of the ``total`` real tokens: the column in a padded input, the offset in its sequence
        otherwise."""
        if self.index is not None:
            return self.index % self.shape[1]
        return positions_in_sequence(self.cu_seqlens, total)


def positions_in_sequence(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Each token's offset in its sequence, for the ``total`` tokens of an unpadded batch (``total`` given by the
    caller so that no host sync is needed to size the result)."""
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), seqlens, output_size=total)
    return torch.arange(total, device=starts.device) - starts


def checks_inputs(t: torch.Tensor) -> bool:
    """Whether the model validates the values of its inputs. On the CPU it always does; elsewhere reading a value
    back stalls the device, so only with ``FASTBERT_CHECK_INPUTS=1`` (a debugging switch: on a GPU an out-of-range id
    otherwise ends in a device-side assert)."""
    return t.device.type == "cpu" or os.environ.get("FASTBERT_CHECK_INPUTS") == "1"


def _check_range(name: str, ids: torch.Tensor, limit: int, what: str) -> None:
    if ids.numel() == 0 or not checks_inputs(ids):
        return
    low, high = torch.aminmax(ids)
    if int(low) < 0 or int(high) >= limit:
        bad = int(high) if int(high) >= limit else int(low)
        where = tuple(int(i) for i in (ids == bad).nonzero()[0])
        raise IndexError(f"{name} holds {bad} at {where}, outside [0, {limit}) ({what})")


def check_token_ids(input_ids, token_type_ids, vocab_size: int, type_vocab_size: int) -> None:
    """Token ids inside the vocabulary, and segment ids (when given) of the same shape inside the segment table, or
    all zero for a model without one (``type_vocab_size=0``); raises naming the value and where it sits."""
    _check_range("input_ids", input_ids, vocab_size, "vocab_size")
    if token_type_ids is None:
        return
    if token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"token_type_ids shape {tuple(token_type_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if type_vocab_size == 0:
        if checks_inputs(token_type_ids) and bool(token_type_ids.any()):
            raise ValueError(
                "token_type_ids hold segment ids but this model has no segment embeddings (type_vocab_size=0)"
            )
    else:
        _check_range("token_type_ids", token_type_ids, type_vocab_size, "type_vocab_size")


def masked_rows(flat_labels: torch.Tensor, masked_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The flat indices of the labelled tokens: the collator's ``masked_positions`` when given (it knows them, so
    the forward pass reads nothing back), else found from ``flat_labels`` (a ``nonzero``, a host sync)."""
    if masked_positions is not None:
        return masked_positions
    return torch.nonzero(flat_labels != IGNORE_INDEX, as_tuple=False).flatten()


def masked_lm_loss(transform, rows, flat_labels, weight, bias, masked_positions=None):
    """(loss, accuracy) of an MLM head over the labelled rows only: ``transform`` (the head's dense + activation +
    LayerNorm) of the labelled rows of ``rows`` (``[tokens, hidden]``, in ``flat_labels``' order), then the fused
    decoder and cross-entropy (``ops.mlm_loss``)."""
    masked = masked_rows(flat_labels, masked_positions)
    return ops.mlm_loss(transform(rows.index_select(0, masked)), weight, bias, flat_labels.index_select(0, masked))


# Outputs --------------------------------------------------------------------------------------------------------
@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None


@dataclass
class PreTrainingOutput:
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    sentence_loss: torch.Tensor | None = None
    mlm_accuracy: torch.Tensor | None = None
    sentence_accuracy: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor


@dataclass
class QuestionAnsweringOutput:
    loss: torch.Tensor | None
    start_logits: torch.Tensor
    end_logits: torch.Tensor


# Modules --------------------------------------------------------------------------------------------------------
class BertEmbeddings(nn.Module):
    """Word + position (+ segment) embeddings, LayerNorm, dropout; ALBERT's projection when factorised."""

    def __init__(self, config: BertConfig):
        super().__init__()
        width = config.embedding_width
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, width) if config.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.projection = nn.Linear(width, config.hidden_size) if config.embedding_size is not None else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor | None):
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        x = ops.dropout(self.norm(x), self.config.hidden_dropout_prob, self.training)
        return self.projection(x) if self.projection is not None else x


class BertLayer(nn.Module):
    """One transformer encoder layer over the unpadded layout, post-LN (BERT) or pre-LN."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def _attention(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        c = self.config
        # The key bias adds q . b_k to every score in a query's row, which the softmax cancels: its exact gradient is
        # 0. Left in, autograd hands it rounding noise instead, which LAMB/Adam normalise into steps of size lr that
        # differ with every summation order (micro-batch size, world size, ZeRO stage). So it is left out: the
        # outputs are the same up to rounding (HF checkpoints load as they are) and the key bias never moves.
        b = self.qkv.bias
        bias = torch.cat([b[: c.hidden_size], b.new_zeros(c.hidden_size), b[2 * c.hidden_size :]])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(x.shape[0], 3, c.num_attention_heads, c.head_dim).unbind(1)
        p = c.attention_probs_dropout_prob if self.training else 0.0
        a = ops.attention(q, k, v, layout.cu_seqlens, layout.max_seqlen, dropout_p=p)
        return F.linear(a.reshape(x.shape), self.attn_out.weight)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(x, self.ffn_in.weight), self.ffn_in.bias, self.config.gelu_approximation)
        return F.linear(h, self.ffn_out.weight)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        c, p, train = self.config, self.config.hidden_dropout_prob, self.training
        if not c.pre_layer_norm:
            x, _ = ops.residual_layer_norm(
                self._attention(x, layout),
                x,
                self.attn_norm.weight,
                self.attn_norm.bias,
                c.layer_norm_eps,
                self.attn_out.bias,
                p,
                train,
            )
            x, _ = ops.residual_layer_norm(
                self._ffn(x), x, self.ffn_norm.weight, self.ffn_norm.bias, c.layer_norm_eps, self.ffn_out.bias, p, train
            )
            return x
        normed, _ = ops.residual_layer_norm(x, None, self.attn_norm.weight, self.attn_norm.bias, c.layer_norm_eps)
        normed, x = ops.residual_layer_norm(
            self._attention(normed, layout),
            x,
            self.ffn_norm.weight,
            self.ffn_norm.bias,
            c.layer_norm_eps,
            self.attn_out.bias,
            p,
            train,
        )
        return x + ops.dropout(self._ffn(normed) + self.ffn_out.bias, p, train)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        # ALBERT's cross-layer sharing: one layer's parameters applied num_hidden_layers times.
        self.layers = nn.ModuleList(
            BertLayer(config) for _ in range(1 if config.share_layers else config.num_hidden_layers)
        )
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_layer_norm else None

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        for i in range(self.config.num_hidden_layers):
            x = self.layers[0 if self.config.share_layers else i](x, layout)
        return self.final_norm(x) if self.final_norm is not None else x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
        """tanh(dense(first token of each sequence)); zero for an empty sequence."""
        starts = layout.cu_seqlens[:-1].long()
        first = hidden[starts.clamp(max=max(hidden.shape[0] - 1, 0))]
        nonempty = (layout.cu_seqlens[1:] > layout.cu_seqlens[:-1]).to(hidden.dtype)[:, None]
        return torch.tanh(self.dense(first)) * nonempty


def init_modules(modules, std: float) -> None:
    """BERT's initialisation of ``modules``, in order: linear and embedding weights from N(0, std), biases zero
    (an embedding's padding row too), LayerNorms the identity, the tied decoder's bias zero."""
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, BertPreTrainingHeads):
            nn.init.zeros_(module.bias)


class BertPreTrainedModel(nn.Module):
    """Shared by every model class: weight init and HF-compatible ``from_pretrained`` / ``save_pretrained``."""

    config: BertConfig

    def init_weights(self) -> None:
        """BERT's initialisation: linear and embedding weights from N(0, initializer_range), biases zero, LayerNorms
        the identity. A head model's encoder (``self.bert``) was initialised by its own constructor, so here only
        the head's modules are drawn: every weight is initialised once."""
        encoder = getattr(self, "bert", None)
        done = set(encoder.modules()) if isinstance(encoder, BertModel) else set()
        init_modules([m for m in self.modules() if m not in done], self.config.initializer_range)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        config: BertConfig | None = None,
        output_loading_info: bool = False,
        **config_overrides,
    ):
        """Load an HF or fastbert checkpoint directory (config.json + model.safetensors or pytorch_model.bin).

        Missing and unexpected keys are reported as a warning (and returned with ``output_loading_info=True``);
        a shape mismatch raises before any weight is copied.
        """
        from fastbert import hf

        return hf.load_pretrained(cls, directory, config, output_loading_info, **config_overrides)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the layout transformers reads (see ``fastbert.hf``)."""
        from fastbert import hf

        hf.save_pretrained(self, directory)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BertModel(BertPreTrainedModel):
    """The encoder. Input either padded (``input_ids [B, S]`` + ``attention_mask``) or unpadded (``input_ids
    [T]`` + ``cu_seqlens``); ``last_hidden_state`` comes back in the layout it went in."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.init_weights()

    def encode(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, cu_seqlens=None, max_seqlen=None
    ) -> tuple[torch.Tensor, Layout]:
        """Run the encoder; returns the flat ``[total_tokens, hidden]`` states and the batch layout."""
        if cu_seqlens is not None:
            if input_ids.dim() != 1:
                raise ValueError(
                    f"with cu_seqlens, input_ids must be flat [total_tokens], got {tuple(input_ids.shape)}"
                )
            if attention_mask is not None:
                raise ValueError("give either attention_mask (padded layout) or cu_seqlens (unpadded), not both")
            layout = Layout.from_cu_seqlens(cu_seqlens, max_seqlen)
            if checks_inputs(layout.cu_seqlens) and int(layout.cu_seqlens[-1]) != input_ids.numel():
                raise ValueError(
                    f"cu_seqlens ends at {int(layout.cu_seqlens[-1])} but input_ids holds {input_ids.numel()} tokens"
                )
        else:
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must be [batch, seq] (or flat with cu_seqlens), got {tuple(input_ids.shape)}"
                )
            if isinstance(attention_mask, Layout):
                layout = attention_mask
                if layout.shape != tuple(input_ids.shape):
                    raise ValueError(
                        f"the layout is for a {layout.shape} batch but input_ids is {tuple(input_ids.shape)}"
                    )
            elif attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            elif attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            if not isinstance(attention_mask, Layout):
                layout = Layout.from_attention_mask(attention_mask)
        self._check_inputs(input_ids, token_type_ids, position_ids, layout)
        ids = layout.unpad(input_ids)
        types = layout.unpad(token_type_ids) if token_type_ids is not None else None
        total = ids.shape[0]
        positions = layout.unpad(position_ids) if position_ids is not None else layout.positions(total)
        hidden = self.encoder(self.embeddings(ids, positions, types), layout)
        return hidden, layout

    def _check_inputs(self, input_ids, token_type_ids, position_ids, layout: Layout) -> None:
        """Out-of-range ids raise here, naming the value and where it sits, instead of failing deep in an index op."""
        c = self.config
        check_token_ids(input_ids, token_type_ids, c.vocab_size, c.type_vocab_size)
        longest = layout.shape[1] if layout.shape is not None else layout.max_seqlen
        if position_ids is not None:
            _check_range("position_ids", position_ids, c.max_position_embeddings, "max_position_embeddings")
        elif longest > c.max_position_embeddings:
            raise IndexError(
                f"a sequence has {longest} positions but max_position_embeddings is "
                f"{c.max_position_embeddings}: the sequence is too long"
            )

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> BertModelOutput:
        hidden, layout = self.encode(input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        pooled = self.pooler(hidden, layout) if self.pooler is not None else None
        return BertModelOutput(layout.pad(hidden), pooled)


class BertPreTrainingHeads(nn.Module):
    """MLM transform + decoder tied to the word embeddings, and the NSP/SOP classifier on the pooled [CLS]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.transform = nn.Linear(config.hidden_size, config.embedding_width)
        self.transform_norm = nn.LayerNorm(config.embedding_width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.sentence = nn.Linear(config.hidden_size, 2) if config.sentence_objective != "none" else None

    def transform_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(hidden, self.transform.weight), self.transform.bias, self.config.gelu_approximation)
        return F.layer_norm(
            h, (h.shape[-1],), self.transform_norm.weight, self.transform_norm.bias, self.config.layer_norm_eps
        )


class BertForPreTraining(BertPreTrainedModel):
    """MLM (+ NSP or SOP). With ``labels``, the MLM head runs on the labelled positions only and returns the losses
    and accuracies; without, it returns ``prediction_logits`` for every token (inference, e.g. filling a [MASK]).
    ``masked_positions`` (the flat indices of the labelled tokens, as the collator gives them) spares the forward pass
    finding them itself, which on a GPU is a host sync."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=config.sentence_objective != "none")
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        next_sentence_label=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
        masked_positions=None,
    ) -> PreTrainingOutput:
        hidden, layout = self.bert.encode(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        out = PreTrainingOutput()
        if self.cls.sentence is not None:
            out.seq_relationship_logits = self.cls.sentence(self.bert.pooler(hidden, layout))
        if labels is None:
            logits = F.linear(self.cls.transform_hidden(hidden), self.decoder_weight, self.cls.bias)
            out.prediction_logits = layout.pad(logits)
        else:
            out.mlm_loss, out.mlm_accuracy = masked_lm_loss(
                self.cls.transform_hidden,
                hidden,
                layout.unpad(labels),
                self.decoder_weight,
                self.cls.bias,
                masked_positions,
            )
            out.loss = out.mlm_loss
        if next_sentence_label is not None:
            if out.seq_relationship_logits is None:
                raise ValueError("next_sentence_label given but the model's sentence_objective is 'none'")
            out.sentence_loss = F.cross_entropy(out.seq_relationship_logits, next_sentence_label.view(-1))
            out.sentence_accuracy = (
                (out.seq_relationship_logits.argmax(-1) == next_sentence_label.view(-1)).float().mean().detach()
            )
            out.loss = out.sentence_loss if out.loss is None else out.loss + out.sentence_loss
        return out


class BertForSequenceClassification(BertPreTrainedModel):
    """Classifier on the pooled [CLS]; regression (MSE) when ``num_labels == 1``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> ClassifierOutput:
        pooled = self.bert(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
        ).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = F.cross_entropy(logits, labels.view(-1))
        return ClassifierOutput(loss, logits)


class BertForTokenClassification(BertPreTrainedModel):
    """Per-token classifier (NER); padding positions get zero logits and are never in the loss."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> ClassifierOutput:
        hidden, layout = self.bert.encode(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, layout.unpad(labels), ignore_index=IGNORE_INDEX)
        return ClassifierOutput(loss, layout.pad(logits))


class BertForQuestionAnswering(BertPreTrainedModel):
    """Start/end span logits per token. Padding positions get the lowest finite logit so no span ends there."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        start_positions=None,
        end_positions=None,
        *,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> QuestionAnsweringOutput:
        hidden, layout = self.bert.encode(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        logits = self.qa_outputs(hidden)
        if layout.index is None:
            raise ValueError("BertForQuestionAnswering needs the padded layout (input_ids [B, S])")
        logits = layout.pad(logits, fill=torch.finfo(logits.dtype).min)
        start_logits, end_logits = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]  # positions outside the sequence are ignored, as in HF
            start = F.cross_entropy(start_logits, start_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            end = F.cross_entropy(end_logits, end_positions.view(-1).clamp(0, ignored), ignore_index=ignored)
            loss = (start + end) / 2
        return QuestionAnsweringOutput(loss, start_logits, end_logits)
