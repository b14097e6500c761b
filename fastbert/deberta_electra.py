"""DeBERTa-v3's pretraining: replaced-token detection with gradient-disentangled embedding sharing (He et al. 2021).

A DeBERTa generator fills the masked tokens, drawn from its MLM distribution as ``fastbert.electra`` draws them
(``ops.mlm_loss_and_sample``, keyed by ``ReplacementKeys``, no gradient through the draw), and a DeBERTa
discriminator tells, at every real token, whether it was replaced. The two share their token embeddings the way
DeBERTa-v3 does: the discriminator's are the generator's with the gradient stopped, plus a delta of its own that
starts at zero, ``E_D = sg(E_G) + E_delta``. So the MLM loss alone trains ``E_G`` (the discriminator's loss cannot
pull it the other way, the tug of war that plain ELECTRA sharing suffers) and ``E_delta`` takes what the
discriminator needs on top. Each encoder keeps its own relative-position table. Sharing needs both at the same
width, so the generator is the discriminator's shape with fewer layers (DeBERTa-v3's: half of them).

``save_pretrained`` writes the discriminator, with ``E_G + E_delta`` as its word embeddings, under transformers'
``deberta-v2`` keys plus its detection head as ``mask_predictions.*`` (as DeBERTa-v3's released checkpoints hold
it, and which transformers' ``DebertaV2Model`` leaves aside), and the generator as ``DebertaV2ForMaskedLM`` in
``generator/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.config import GELU_APPROXIMATION
from fastbert.deberta import DebertaConfig, DebertaMLMHead, DebertaModel, checkpoint_key_map
from fastbert.electra import DISCRIMINATOR_WEIGHT, ElectraOutput
from fastbert.model import Layout, init_modules, masked_rows


def generator_config(config: DebertaConfig, size: float | None = None, layers: int | None = None) -> DebertaConfig:
    """The generator for the discriminator ``config``: its shape with ``layers`` layers (default: half, at least
    one). ``size``, the width as a fraction of the discriminator's, must be 1 (or None): the shared embeddings are
    used by both at one width."""
    if size is not None and size != 1.0:
        raise ValueError(
            f"a DeBERTa generator shares the discriminator's embeddings (gradient-disentangled sharing), so it has "
            f"the same width: --generator-size must be 1, got {size}; make it smaller with --generator-layers"
        )
    layers = max(1, config.num_hidden_layers // 2) if layers is None else layers
    if layers < 1:
        raise ValueError(f"the generator needs at least one layer, got {layers}")
    return config.replace(num_hidden_layers=layers)


class DetectionHead(nn.Module):
    """DeBERTa-v3's replaced-token detection head (``mask_predictions``): dense, activation, LayerNorm, one logit."""

    def __init__(self, config: DebertaConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        approximate = GELU_APPROXIMATION[self.config.hidden_act]
        h = ops.bias_gelu(F.linear(hidden, self.dense.weight), self.dense.bias, approximate)
        h = F.layer_norm(h, (h.shape[-1],), self.norm.weight, self.norm.bias, self.config.layer_norm_eps)
        return self.classifier(h).squeeze(-1)


class DebertaElectraForPreTraining(nn.Module):
    """Generator and discriminator trained together; inputs as ``DebertaForPreTraining``'s plus ``replacement_keys``
    (one per masked token), output ``fastbert.electra.ElectraOutput``."""

    def __init__(
        self,
        config: DebertaConfig,
        generator: DebertaConfig,
        discriminator_weight: float = DISCRIMINATOR_WEIGHT,
        sampling_temperature: float = 1.0,
    ):
        super().__init__()
        if (generator.vocab_size, generator.hidden_size) != (config.vocab_size, config.hidden_size):
            raise ValueError(
                f"the generator's embeddings ({generator.vocab_size} x {generator.hidden_size}) must have the "
                f"discriminator's shape ({config.vocab_size} x {config.hidden_size}): they are shared"
            )
        self.config, self.generator_config = config, generator
        self.discriminator_weight = discriminator_weight
        self.sampling_temperature = sampling_temperature  # the generator's draws: softmax(logits / T)
        self.generator = DebertaModel(generator)
        self.discriminator = DebertaModel(config)
        # The discriminator looks its tokens up in sg(E_G) + E_delta: it has no table of its own.
        self.discriminator.embeddings.word_embeddings = None
        self.embedding_delta = nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size))
        self.generator_head = DebertaMLMHead(generator)
        self.discriminator_head = DetectionHead(config)
        init_modules([*self.generator_head.modules(), *self.discriminator_head.modules()], config.initializer_range)

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.generator.embeddings.word_embeddings.weight

    def discriminator_word_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """``sg(E_G)[ids] + E_delta[ids]``: two lookups, never the summed table."""
        return F.embedding(ids, self.decoder_weight).detach() + F.embedding(ids, self.embedding_delta)

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
        masked_positions=None,
        replacement_keys=None,
    ) -> ElectraOutput:
        if labels is None or replacement_keys is None:
            raise ValueError("ELECTRA's forward pass needs the masking labels and the replacement keys")
        del position_ids  # relative positions come from token order (see DebertaForPreTraining)
        hidden, mask, layout = self.generator.encode_any(
            input_ids, attention_mask, token_type_ids, None, cu_seqlens, max_seqlen
        )
        if layout is None:
            layout = Layout.from_attention_mask(mask)
        unpadded = cu_seqlens is not None
        flat_ids = input_ids if unpadded else layout.unpad(input_ids)
        flat_labels = labels.reshape(-1) if unpadded else layout.unpad(labels)
        masked = masked_rows(flat_labels, masked_positions)
        targets = flat_labels.index_select(0, masked)
        mlm_loss, mlm_accuracy, samples = ops.mlm_loss_and_sample(
            self.generator_head.transform_hidden(layout.unpad(hidden).index_select(0, masked)),
            self.decoder_weight,
            self.generator_head.bias,
            targets,
            replacement_keys,
            self.sampling_temperature,
        )
        corrupted = flat_ids.index_copy(0, masked, samples.to(flat_ids.dtype))
        original = flat_ids.index_copy(0, masked, targets)
        replaced = corrupted != original  # a draw of the original token counts as original
        corrupted_ids = corrupted if unpadded else layout.pad(corrupted)
        hidden, _, _ = self.discriminator.encode_any(
            corrupted_ids,
            attention_mask,
            token_type_ids,
            None,
            cu_seqlens,
            max_seqlen,
            word_vectors=self.discriminator_word_vectors(corrupted_ids),
        )
        logits = self.discriminator_head(layout.unpad(hidden))
        compute = torch.promote_types(logits.dtype, torch.float32)
        discriminator_loss = F.binary_cross_entropy_with_logits(logits.to(compute), replaced.to(compute))
        with torch.no_grad():
            predicted = logits > 0
            counts = torch.stack(
                [(predicted == replaced).sum(), (predicted & replaced).sum(), predicted.sum(), replaced.sum()]
            ).double()
        return ElectraOutput(
            loss=mlm_loss + self.discriminator_weight * discriminator_loss,
            mlm_loss=mlm_loss,
            mlm_accuracy=mlm_accuracy,
            discriminator_loss=discriminator_loss,
            discriminator_weight=self.discriminator_weight,
            discriminator_counts=counts,
            discriminator_logits=logits if unpadded else layout.pad(logits),
            corrupted_ids=corrupted_ids,
            replaced=replaced.long() if unpadded else layout.pad(replaced.long()),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # transformers' layout -----------------------------------------------------------------------------------------
    def hf_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The discriminator's weights under transformers' ``deberta-v2`` keys (word embeddings ``E_G + E_delta``)
        with its head as ``mask_predictions.*``, and the generator's as ``DebertaV2ForMaskedLM``'s."""

        def encoder(model: DebertaModel, words: torch.Tensor) -> dict[str, torch.Tensor]:
            state = dict(model.state_dict())
            state["embeddings.word_embeddings.weight"] = words
            names = checkpoint_key_map(model)
            names.setdefault("embeddings.word_embeddings.weight", "deberta.embeddings.word_embeddings.weight")
            return {names[k]: v for k, v in state.items()}

        d, g = self.discriminator_head, self.generator_head
        discriminator = {
            **encoder(self.discriminator, self.decoder_weight + self.embedding_delta),
            "mask_predictions.dense.weight": d.dense.weight,
            "mask_predictions.dense.bias": d.dense.bias,
            "mask_predictions.LayerNorm.weight": d.norm.weight,
            "mask_predictions.LayerNorm.bias": d.norm.bias,
            "mask_predictions.classifier.weight": d.classifier.weight,
            "mask_predictions.classifier.bias": d.classifier.bias,
        }
        generator = {
            **encoder(self.generator, self.decoder_weight),
            "lm_predictions.lm_head.dense.weight": g.transform.weight,
            "lm_predictions.lm_head.dense.bias": g.transform.bias,
            "lm_predictions.lm_head.LayerNorm.weight": g.transform_norm.weight,
            "lm_predictions.lm_head.LayerNorm.bias": g.transform_norm.bias,
            "lm_predictions.lm_head.bias": g.bias,
        }
        return tuple(
            {k: v.detach().float().contiguous().cpu() for k, v in s.items()} for s in (discriminator, generator)
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The discriminator in ``directory`` (transformers' ``DebertaV2Model`` reads it) and the generator as
        ``DebertaV2ForMaskedLM`` in ``directory/generator``: config.json and model.safetensors each."""
        from fastbert.hf import write_checkpoint

        directory = Path(directory)
        discriminator, generator = self.hf_state_dicts()
        for where, state, config, architecture in (
            (directory, discriminator, self.config, "DebertaV2Model"),
            (directory / "generator", generator, self.generator_config, "DebertaV2ForMaskedLM"),
        ):
            write_checkpoint(where, state, config.to_json_string(architecture))
