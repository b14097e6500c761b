"""Examples -> model inputs for each fine-tuning task, and model outputs -> predictions.

Classification and regression batches go through the tokenizer's ``__call__``. NER encodes word by word, so each
word's label sits on its first sub-token (the others get -100) and predictions map back to words exactly. QA cuts
contexts longer than the window into overlapping windows (``doc_stride``), marks the answer's token span in the
windows that contain it ([CLS] otherwise), and decodes answers from the n-best start/end pairs of all windows of a
question, with a no-answer threshold for SQuAD v2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastbert.config import IGNORE_INDEX
from fastbert.tasks.formats import QAExample, TokenExample


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


# NER --------------------------------------------------------------------------------------------------------------
@dataclass
class TokenFeature:
    input_ids: list[int]
    labels: list[int]
    first_subtoken: list[int | None]  # per word: index of its first sub-token, None when cut off or empty


def token_features(tokenizer, example: TokenExample, label_ids: dict[str, int] | None, max_length: int) -> TokenFeature:
    pieces = tokenizer.encode_batch(example.words, add_special_tokens=False, num_threads=1)
    ids, labels, first = [tokenizer.cls_token_id], [IGNORE_INDEX], []
    for w, word_ids in enumerate(pieces):
        if not word_ids or len(ids) + len(word_ids) > max_length - 1:
            first.append(None)
            continue
        first.append(len(ids))
        tag = label_ids[example.tags[w]] if label_ids is not None and example.tags is not None else IGNORE_INDEX
        ids += word_ids
        labels += [tag] + [IGNORE_INDEX] * (len(word_ids) - 1)
    return TokenFeature(ids + [tokenizer.sep_token_id], labels + [IGNORE_INDEX], first)


def collate_tokens(features: list[TokenFeature], pad_id: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": _pad([f.input_ids for f in features], pad_id),
        "attention_mask": _pad([[1] * len(f.input_ids) for f in features], 0),
        "labels": _pad([f.labels for f in features], IGNORE_INDEX),
    }


# QA ---------------------------------------------------------------------------------------------------------------
@dataclass
class QAFeature:
    example_index: int
    input_ids: list[int]
    token_type_ids: list[int]
    context_offsets: list[tuple[int, int] | None]  # per token: its character span in the context, None outside it
    start_position: int
    end_position: int


def qa_features(
    tokenizer, examples: list[QAExample], max_length: int = 384, doc_stride: int = 128, max_query_length: int = 64
) -> list[QAFeature]:
    questions = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False)
    contexts = tokenizer([e.context for e in examples], add_special_tokens=False, return_offsets_mapping=True)
    features = []
    for i, example in enumerate(examples):
        q = questions[i][:max_query_length]
        c_ids, c_offsets = contexts["input_ids"][i], contexts["offset_mapping"][i]
        room = max_length - len(q) - 3
        if room < 1:
            raise ValueError(f"{example.where}: max_length {max_length} leaves no room for the context")
        starts = list(range(0, max(len(c_ids) - room, 0) + 1, doc_stride))
        if starts[-1] + room < len(c_ids):
            starts.append(len(c_ids) - room)
        prefix = [tokenizer.cls_token_id, *q, tokenizer.sep_token_id]
        for s in starts:
            window = range(s, min(s + room, len(c_ids)))
            start_pos = end_pos = 0
            if example.answers:
                a_text, a_start = example.answers[0]
                a_end = a_start + len(a_text)
                tok_start = next((t for t in window if c_offsets[t][1] > a_start), None)
                tok_end = next((t for t in reversed(window) if c_offsets[t][0] < a_end), None)
                if (
                    tok_start is not None
                    and tok_end is not None
                    and c_offsets[window[0]][0] <= a_start
                    and c_offsets[window[-1]][1] >= a_end
                    and tok_start <= tok_end
                ):
                    start_pos, end_pos = len(prefix) + tok_start - s, len(prefix) + tok_end - s
            ids = prefix + [c_ids[t] for t in window] + [tokenizer.sep_token_id]
            offsets = [None] * len(prefix) + [tuple(c_offsets[t]) for t in window] + [None]
            types = [0] * len(prefix) + [1] * (len(window) + 1)
            features.append(QAFeature(i, ids, types, offsets, start_pos, end_pos))
            if s + room >= len(c_ids):
                break
    return features


def collate_qa(features: list[QAFeature], pad_id: int, with_positions: bool = True) -> dict[str, torch.Tensor]:
    ids = _pad([f.input_ids for f in features], pad_id)
    batch = {
        "input_ids": ids,
        "token_type_ids": _pad([f.token_type_ids for f in features], 0),
        "attention_mask": _pad([[1] * len(f.input_ids) for f in features], 0),
    }
    if with_positions:
        batch["start_positions"] = torch.tensor([f.start_position for f in features])
        batch["end_positions"] = torch.tensor([f.end_position for f in features])
    return batch


def decode_answers(
    examples: list[QAExample],
    features: list[QAFeature],
    start_logits: list[torch.Tensor],
    end_logits: list[torch.Tensor],
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float | None = None,
    return_scores: bool = False,
) -> dict[str, str] | dict[str, tuple[str, float | None]]:
    """The best span per question over all its windows; with ``null_threshold`` (SQuAD v2) the empty answer wins
    when its score beats the best span's by more than the threshold. With ``return_scores``, each answer comes with
    its score: the span's start + end logit (the no-answer score, [CLS]'s, when the empty answer wins; None when no
    window held a valid span)."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f, s_log, e_log in zip(features, start_logits, end_logits, strict=True):
        s_log, e_log = s_log[: len(f.input_ids)], e_log[: len(f.input_ids)]
        score_null = float(s_log[0] + e_log[0])
        null[f.example_index] = min(null.get(f.example_index, score_null), score_null)
        starts = torch.topk(s_log, min(n_best, len(s_log))).indices.tolist()
        ends = torch.topk(e_log, min(n_best, len(e_log))).indices.tolist()
        context = examples[f.example_index].context
        for s in starts:
            for e in ends:
                if (
                    f.context_offsets[s] is None
                    or f.context_offsets[e] is None
                    or e < s
                    or e - s + 1 > max_answer_length
                ):
                    continue
                score = float(s_log[s] + e_log[e])
                if score > best.get(f.example_index, (float("-inf"), ""))[0]:
                    best[f.example_index] = (score, context[f.context_offsets[s][0] : f.context_offsets[e][1]])
    answers = {}
    for i, example in enumerate(examples):
        score, text = best.get(i, (float("-inf"), ""))
        if null_threshold is not None and null.get(i, float("-inf")) - score > null_threshold:
            text, score = "", null.get(i, float("-inf"))
        answers[example.id] = (text, score if math.isfinite(score) else None) if return_scores else text
    return answers
