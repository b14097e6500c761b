"""ELECTRA's replaced-token detection (Clark et al. 2020): a small generator that fills in masked tokens and a
discriminator that tells, at every real token, whether it was replaced.

Both are ``fastbert.model.BertModel`` encoders sharing one set of embeddings (word, position, segment and their
LayerNorm, as in Google's ELECTRA), of the discriminator's embedding width; an encoder narrower than that width
reaches it through its own projection (transformers' ``embeddings_project``). The generator's MLM head is HF's
``ElectraGeneratorPredictions`` (dense, GELU, LayerNorm to the embedding width) and the tied word embeddings plus a
bias; the discriminator's head is ``ElectraDiscriminatorPredictions`` (dense, activation, dense to one logit). So a
model here exports 1:1 to transformers' ``ElectraForPreTraining`` and ``ElectraForMaskedLM`` (``save_pretrained``).

Replacements are drawn from the generator's distribution at the masked positions only and carry no gradient; each
draw (``ops.mlm_loss_and_sample``, Gumbel-max in the fused MLM loss) is keyed by a hash of (seed, epoch, sample index,
position), which ``ReplacementKeys`` adds to a collated batch, so the draws do not depend on world size, micro-batch or
loader workers. A replacement equal to the original token counts as original. This module does not mask
(``fastbert.data.masking``) or train (``fastbert.train``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastbert import ops
from fastbert.config import BertConfig
from fastbert.data.splitmix import GOLDEN, mix64
from fastbert.model import BertModel, init_modules, masked_rows

GENERATOR_SIZE = 0.25  # the generator's share of the discriminator's width, heads and FFN (Clark et al. 2020)
DISCRIMINATOR_WEIGHT = 50.0  # lambda, the discriminator loss's weight against the generator's (Clark et al. 2020)
GENERATOR_CONFIG = "generator_config.json"  # beside config.json in a run and its checkpoints
# The draw's purpose in the (seed, epoch, sample, position, purpose) hash; masking uses 1 to 4.
_REPLACEMENT_PURPOSE = 101


def generator_config(config: BertConfig, size: float = GENERATOR_SIZE, layers: int | None = None) -> BertConfig:
    """The generator for the discriminator ``config``: ``size`` times its hidden size, heads and intermediate size
    (heads at least 1, the width a multiple of them), ``layers`` layers (default: the discriminator's), embeddings of
    the discriminator's width."""
    if not 0.0 < size <= 1.0:
        raise ValueError(f"the generator size must be a fraction in (0, 1], got {size}")
    heads = max(1, round(config.num_attention_heads * size))
    head_dim = max(1, round(config.hidden_size * size / heads))
    hidden = heads * head_dim
    width = config.embedding_width
    return config.replace(
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=max(1, round(config.intermediate_size * size)),
        num_hidden_layers=layers if layers is not None else config.num_hidden_layers,
        embedding_size=None if hidden == width else width,
        sentence_objective="none",
    )


# Replacement keys -------------------------------------------------------------------------------------------------
def replacement_keys(seed: int, epochs: np.ndarray, samples: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The int64 key of each masked token's draw, a hash of (seed, epoch, sample index, position in the sample)."""
    with np.errstate(over="ignore"):
        h = mix64(np.uint64(seed) * np.uint64(GOLDEN) + np.uint64(_REPLACEMENT_PURPOSE))
        h = mix64(h ^ np.asarray(epochs).astype(np.uint64))
        h = mix64(h ^ np.asarray(samples).astype(np.uint64))
        h = mix64(h ^ np.asarray(positions).astype(np.uint64))
    return np.asarray(h, dtype=np.uint64).view(np.int64)


class ReplacementKeys:
    """Wraps a collator of unpadded masked batches (``MaskingCollator``) and adds ``replacement_keys [M]``, the key
    of each masked position's draw, computed here where the samples' indices and epochs are known."""

    def __init__(self, collate, seed: int):
        self.collate, self.seed = collate, seed

    def __call__(self, samples, indices: np.ndarray, epochs: np.ndarray) -> dict:
        batch = self.collate(samples, indices, epochs)
        if "cu_seqlens" not in batch:
            raise ValueError("ELECTRA's replacement keys need the unpadded batch layout (cu_seqlens)")
        lengths = np.diff(batch["cu_seqlens"].numpy().astype(np.int64))
        sequence = np.repeat(np.arange(len(lengths)), lengths)
        masked = batch["masked_positions"].numpy()
        row = sequence[masked]
        keys = replacement_keys(
            self.seed,
            np.asarray(epochs, dtype=np.int64)[row],
            np.asarray(indices, dtype=np.int64)[row],
            batch["position_ids"].numpy()[masked],
        )
        batch["replacement_keys"] = torch.from_numpy(keys)
        return batch


# Model ------------------------------------------------------------------------------------------------------------
@dataclass
class ElectraOutput:
    """``mlm_loss``/``mlm_accuracy`` are the generator's (mean over masked tokens), ``discriminator_loss`` the mean
    binary cross-entropy over real tokens; ``loss`` = mlm_loss + discriminator_weight x discriminator_loss.
    ``discriminator_counts`` (detached, float64): correct predictions, replaced tokens detected, tokens predicted
    replaced, tokens replaced. ``corrupted_ids`` and ``replaced`` (0/1) come back in the input's layout."""

    loss: torch.Tensor
    mlm_loss: torch.Tensor
    mlm_accuracy: torch.Tensor
    discriminator_loss: torch.Tensor
    discriminator_weight: float
    discriminator_counts: torch.Tensor
    discriminator_logits: torch.Tensor
    corrupted_ids: torch.Tensor
    replaced: torch.Tensor
    sentence_loss: None = None


class GeneratorHead(nn.Module):
    """HF's ``ElectraGeneratorPredictions`` (dense to the embedding width, GELU, LayerNorm) and the decoder's bias;
    the decoder's weight is the shared word embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.embedding_width)
        self.norm = nn.LayerNorm(config.embedding_width, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(hidden, self.dense.weight), self.dense.bias)  # exact GELU, as HF's head
        return F.layer_norm(h, (h.shape[-1],), self.norm.weight, self.norm.bias, self.config.layer_norm_eps)


class DiscriminatorHead(nn.Module):
    """HF's ``ElectraDiscriminatorPredictions``: dense, the config's activation, dense to one logit per token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.prediction = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(hidden, self.dense.weight), self.dense.bias, self.config.gelu_approximation)
        return self.prediction(h).squeeze(-1)


class ElectraForPreTraining(nn.Module):
    """Generator and discriminator trained together. Inputs as ``BertForPreTraining``'s with ``labels`` (and, in the
    unpadded layout, ``masked_positions``) from the masking collator, plus ``replacement_keys [M]``."""

    def __init__(
        self,
        config: BertConfig,
        generator: BertConfig,
        discriminator_weight: float = DISCRIMINATOR_WEIGHT,
        sampling_temperature: float = 1.0,
    ):
        super().__init__()
        if config.sentence_objective != "none":
            raise ValueError(f"ELECTRA has no sentence objective, but the config has {config.sentence_objective!r}")
        if generator.embedding_width != config.embedding_width or generator.vocab_size != config.vocab_size:
            raise ValueError(
                f"the generator's embeddings ({generator.vocab_size} x {generator.embedding_width}) must be the "
                f"discriminator's ({config.vocab_size} x {config.embedding_width}): they are shared"
            )
        self.config, self.generator_config = config, generator
        self.discriminator_weight = discriminator_weight
        self.sampling_temperature = sampling_temperature  # the generator's draws: softmax(logits / T)
        self.discriminator = BertModel(config, add_pooling_layer=False)
        self.generator = BertModel(generator, add_pooling_layer=False)
        shared, own = self.discriminator.embeddings, self.generator.embeddings
        own.word_embeddings, own.position_embeddings = shared.word_embeddings, shared.position_embeddings
        own.token_type_embeddings, own.norm = shared.token_type_embeddings, shared.norm
        self.generator_head = GeneratorHead(generator)
        self.discriminator_head = DiscriminatorHead(config)
        init_modules([*self.generator_head.modules(), *self.discriminator_head.modules()], config.initializer_range)

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self.discriminator.embeddings.word_embeddings.weight

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
        hidden, layout = self.generator.encode(
            input_ids, attention_mask, token_type_ids, position_ids, cu_seqlens, max_seqlen
        )
        flat_ids, flat_labels = layout.unpad(input_ids), layout.unpad(labels)
        masked = masked_rows(flat_labels, masked_positions)
        targets = flat_labels.index_select(0, masked)
        mlm_loss, mlm_accuracy, samples = ops.mlm_loss_and_sample(
            self.generator_head(hidden.index_select(0, masked)),
            self.decoder_weight,
            self.generator_head.bias,
            targets,
            replacement_keys,
            self.sampling_temperature,
        )
        corrupted = flat_ids.index_copy(0, masked, samples.to(flat_ids.dtype))
        original = flat_ids.index_copy(0, masked, targets)
        replaced = corrupted != original  # a draw of the original token counts as original
        corrupted_ids, mask, cu_seqlens, max_seqlen = layout.encoder_inputs(corrupted)
        hidden, _ = self.discriminator.encode(corrupted_ids, mask, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        logits = self.discriminator_head(hidden)
        compute = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for a float64 model
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
            discriminator_logits=layout.pad(logits),
            corrupted_ids=corrupted_ids,
            replaced=layout.pad(replaced.long()),
        )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # transformers' layout -----------------------------------------------------------------------------------------
    def hf_state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The weights of transformers' ``ElectraForPreTraining`` (discriminator) and ``ElectraForMaskedLM``
        (generator), under their key names; the generator's decoder weight is left out, transformers ties it to the
        word embeddings."""
        from fastbert import hf

        def encoder(model: BertModel) -> dict[str, torch.Tensor]:
            state, out = model.state_dict(), {}
            for key, names in hf.checkpoint_key_map(model, "electra").items():
                parts = state[key].chunk(len(names)) if len(names) > 1 else (state[key],)
                out.update((name, part) for name, part in zip(names, parts, strict=True))
            return out

        d, g = self.discriminator_head, self.generator_head
        discriminator = {
            **encoder(self.discriminator),
            "discriminator_predictions.dense.weight": d.dense.weight,
            "discriminator_predictions.dense.bias": d.dense.bias,
            "discriminator_predictions.dense_prediction.weight": d.prediction.weight,
            "discriminator_predictions.dense_prediction.bias": d.prediction.bias,
        }
        generator = {
            **encoder(self.generator),
            "generator_predictions.dense.weight": g.dense.weight,
            "generator_predictions.dense.bias": g.dense.bias,
            "generator_predictions.LayerNorm.weight": g.norm.weight,
            "generator_predictions.LayerNorm.bias": g.norm.bias,
            "generator_lm_head.bias": g.bias,
        }
        discriminator, generator = (
            {k: v.detach().float().contiguous().cpu() for k, v in s.items()} for s in (discriminator, generator)
        )
        return discriminator, generator

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The discriminator as transformers' ``ElectraForPreTraining`` in ``directory``, the generator as
        ``ElectraForMaskedLM`` in ``directory/generator``: config.json and model.safetensors each."""
        from fastbert.hf import write_checkpoint

        directory = Path(directory)
        discriminator, generator = self.hf_state_dicts()
        for where, state, config, architecture in (
            (directory, discriminator, self.config, "ElectraForPreTraining"),
            (directory / "generator", generator, self.generator_config, "ElectraForMaskedLM"),
        ):
            text = json.dumps({**config.to_electra_dict(), "architectures": [architecture]}, indent=2, sort_keys=True)
            write_checkpoint(where, state, text)
