"""``--task ner``: a tag per word of a CoNLL file, predicted at the word's first sub-token; entity-level F1."""

from __future__ import annotations

import torch

from fastbert.config import IGNORE_INDEX
from fastbert.model import BertForTokenClassification
from fastbert.tasks import features as feats
from fastbert.tasks import formats, metrics
from fastbert.tasks.base import Task


class NerTask(Task):
    name = "ner"
    head = BertForTokenClassification
    main_metric = "f1"
    labelled = True

    @classmethod
    def head_config(cls, label_names: list[str] | None) -> dict:
        return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names))}

    def read(self, path: str, labelled: bool = True) -> list:
        return formats.read_conll(path, with_tags=labelled, skip_bad_rows=self.args.skip_bad_rows, bad=self.bad)

    def features(self, examples: list) -> list:
        ids = {name: i for i, name in enumerate(self.label_names)}
        return [feats.token_features(self.tokenizer, ex, ids, self.args.max_length) for ex in examples]

    def collate(self, batch: list, with_labels: bool = True) -> dict[str, torch.Tensor]:
        collated = feats.collate_tokens(batch, self.tokenizer.pad_token_id)
        if not with_labels:
            del collated["labels"]
        return collated

    def loss_count(self, collated: dict[str, torch.Tensor]) -> int:
        """The labelled tokens (each word's first sub-token): the head's loss is a mean over them."""
        return int((collated["labels"] != IGNORE_INDEX).sum())

    def decode(self, model, examples: list, features: list, outputs: list, with_scores: bool) -> list:
        """Each word's most probable tag ("O" for a word cut off by --max-length); its scores are
        ``{"probabilities": [p, ...]}``, the chosen tag's probability per word (None for a word cut off)."""
        names = self.model_labels(model)
        result = []
        for feature, logits in zip(features, outputs, strict=True):
            probs = torch.softmax(logits, dim=-1)
            chosen = probs.argmax(-1).tolist()
            tags = [names[chosen[i]] if i is not None else "O" for i in feature.first_subtoken]
            if with_scores:
                word_probs = [float(probs[i, chosen[i]]) if i is not None else None for i in feature.first_subtoken]
                result.append((tags, {"probabilities": word_probs}))
            else:
                result.append(tags)
        return result

    def metrics(self, examples: list, predictions: list) -> dict[str, float]:
        return metrics.entity_metrics([ex.tags for ex in examples], predictions)
