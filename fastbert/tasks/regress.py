"""``--task regress``: a number per text (or pair), one linear output on [CLS] trained on the mean squared error,
Pearson correlation as the main metric."""

from __future__ import annotations

import torch

from fastbert.model import BertForSequenceClassification
from fastbert.tasks import metrics
from fastbert.tasks.base import TableTask


class RegressTask(TableTask):
    name = "regress"
    head = BertForSequenceClassification  # with one label it computes the mean squared error
    main_metric = "pearson"
    regression = True

    @classmethod
    def head_config(cls, label_names: list[str] | None) -> dict:
        return {"num_labels": 1}

    def label_tensor(self, labels: list) -> torch.Tensor:
        return torch.tensor(labels, dtype=torch.float32)

    def decode(self, model, examples: list, features: list, outputs: list, with_scores: bool) -> list:
        """The head's value; its scores are ``{"score": value}``."""
        values = [float(o.squeeze()) for o in outputs]
        return [(v, {"score": v}) for v in values] if with_scores else values

    def metrics(self, examples: list, predictions: list) -> dict[str, float]:
        return metrics.regression_metrics([ex.label for ex in examples], predictions)
