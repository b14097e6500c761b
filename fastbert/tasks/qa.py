"""``--task qa``: extractive question answering on SQuAD v1.1/v2.0 JSON, contexts cut into overlapping windows
(--max-length, --doc-stride), answers decoded from the best start/end pair (--max-answer-length, and
--null-threshold for unanswerable questions); SQuAD F1."""

from __future__ import annotations

import torch

from fastbert.model import BertForQuestionAnswering
from fastbert.tasks import features as feats
from fastbert.tasks import formats, metrics
from fastbert.tasks.base import Task


class QATask(Task):
    name = "qa"
    head = BertForQuestionAnswering
    main_metric = "f1"

    def read(self, path: str, labelled: bool = True) -> list:
        """Questions with their answers: a SQuAD file always has them (a prediction file's are not used)."""
        return formats.read_squad(path, skip_bad_rows=self.args.skip_bad_rows, bad=self.bad)

    def features(self, examples: list) -> list:
        return feats.qa_features(self.tokenizer, examples, self.args.max_length, self.args.doc_stride)

    def collate(self, batch: list, with_labels: bool = True) -> dict[str, torch.Tensor]:
        return feats.collate_qa(batch, self.tokenizer.pad_token_id, with_labels)

    def outputs(self, output) -> list:
        return list(zip(output.start_logits.float().cpu(), output.end_logits.float().cpu(), strict=True))

    def decode(self, model, examples: list, features: list, outputs: list, with_scores: bool) -> list:
        """The answer text; its scores are ``{"score": s}``, the span's start + end logit (the no-answer score when
        the empty answer wins, None when no span was found)."""
        answers = feats.decode_answers(
            examples,
            features,
            [start for start, _ in outputs],
            [end for _, end in outputs],
            max_answer_length=self.args.max_answer_length,
            null_threshold=self.args.null_threshold,
            return_scores=True,
        )
        found = [answers[ex.id] for ex in examples]
        return [(text, {"score": score}) for text, score in found] if with_scores else [text for text, _ in found]

    def metrics(self, examples: list, predictions: list) -> dict[str, float]:
        golds = {ex.id: [text for text, _ in ex.answers] for ex in examples}
        return metrics.squad_metrics(golds, {ex.id: p for ex, p in zip(examples, predictions, strict=True)})
