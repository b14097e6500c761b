"""``--task classify``: a class per text (a pair of texts with --pair-column), a softmax head on [CLS], accuracy."""

from __future__ import annotations

import torch

from fastbert.model import BertForSequenceClassification
from fastbert.tasks import metrics
from fastbert.tasks.base import TableTask


class ClassifyTask(TableTask):
    name = "classify"
    head = BertForSequenceClassification
    main_metric = "accuracy"
    labelled = True

    @classmethod
    def head_config(cls, label_names: list[str] | None) -> dict:
        return {"num_labels": len(label_names), "id2label": dict(enumerate(label_names))}

    def label_tensor(self, labels: list) -> torch.Tensor:
        index = {name: i for i, name in enumerate(self.label_names)}
        return torch.tensor([index[label] for label in labels])

    def decode(self, model, examples: list, features: list, outputs: list, with_scores: bool) -> list:
        """The most probable label; its scores are ``{"probabilities": {label: p}}``, the softmax over the labels
        in the model's id order."""
        names = self.model_labels(model)
        result = []
        for logits in outputs:
            probs = torch.softmax(logits, dim=-1).tolist()
            label = names[int(logits.argmax())]
            result.append((label, {"probabilities": dict(zip(names, probs, strict=True))}) if with_scores else label)
        return result

    def metrics(self, examples: list, predictions: list) -> dict[str, float]:
        return metrics.classification_metrics([ex.label for ex in examples], predictions)
