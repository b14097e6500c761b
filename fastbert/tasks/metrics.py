"""Fine-tuning metrics, computed by the libraries people trust where such a library exists: scikit-learn
(accuracy, F1, MCC), SciPy (Pearson, Spearman), seqeval (entity-level F1). SQuAD exact match and F1 follow the
official v1.1/v2.0 evaluation script's answer normalisation (lowercase, no punctuation, no articles, single
spaces), which no maintained library packages offline."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence


def classification_metrics(labels: Sequence, predictions: Sequence) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    binary = len(set(labels) | set(predictions)) <= 2
    average = "binary" if binary else "macro"
    pos = sorted(set(labels) | set(predictions))[-1] if binary else 1
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average=average, pos_label=pos, zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def regression_metrics(labels: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    return {
        "pearson": float(pearsonr(labels, predictions)[0]),
        "spearman": float(spearmanr(labels, predictions)[0]),
        "mse": float(sum((a - b) ** 2 for a, b in zip(labels, predictions, strict=True)) / len(labels)),
    }


def entity_metrics(labels: list[list[str]], predictions: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "f1": float(f1_score(labels, predictions)),
        "precision": float(precision_score(labels, predictions)),
        "recall": float(recall_score(labels, predictions)),
        "accuracy": float(accuracy_score(labels, predictions)),
    }


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(golds: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """Exact match and F1 in percent, each question scored against its best gold answer ('' = no answer)."""
    em = f1 = 0.0
    for qid, answers in golds.items():
        prediction = predictions.get(qid, "")
        answers = answers or [""]
        em += max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)
        f1 += max(_f1(prediction, a) for a in answers)
    n = max(len(golds), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
