"""What a fine-tuning task is to the training loop: the ``Task`` base class every task subclasses, and
``TableTask``, the base of the sentence-level tasks that read a table and encode it with the tokenizer.

A task owns its examples from file to metric: which file format and columns it reads, how examples become
features and batches, which model head it trains and with what config, how the head's outputs decode into
predictions (and the scores written beside them), its metrics and the main one that picks the best epoch, and what
its loss is a mean over. The loop (``fastbert.train.finetune``) owns none of it. The registry of names lives in
``fastbert.tasks``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fastbert.tasks import formats


class Task:
    """One fine-tuning run's task: its arguments (a ``FinetuneArgs``), the tokenizer once the model is known, the
    label set once the training file is read, and the rows skipped under ``--skip-bad-rows``.

    A subclass sets ``name`` (its ``--task``), ``head`` (the model class from ``fastbert.model``) and
    ``main_metric`` (a key of what ``metrics`` returns, higher being better), and implements ``read``, ``collate``,
    ``decode`` and ``metrics``; the defaults of the others fit a task whose features are its examples, whose head
    has no config of its own and whose loss is a mean over a batch's rows."""

    name: ClassVar[str]
    head: ClassVar[type[torch.nn.Module]]
    main_metric: ClassVar[str]
    labelled: ClassVar[bool] = False  # whether examples carry labels from a set (classes or tags): --labels applies

    def __init__(self, args):
        self.args = args
        self.tokenizer = None
        self.label_names: list[str] | None = None
        self.bad = formats.BadRows()

    @classmethod
    def check_args(cls, args) -> None:
        """Refuse arguments that make no sense for this task and fill in its defaults (in ``FinetuneArgs``)."""
        if args.labels is not None and not cls.labelled:
            from fastbert.tasks import TASKS

            labelled = ", ".join(name for name, task in TASKS.items() if task.labelled)
            raise ValueError(f"--labels applies to --task {labelled}, not {cls.name}")

    @classmethod
    def head_config(cls, label_names: list[str] | None) -> dict:
        """Config overrides of the head (its number of outputs, its labels) for a model built from a checkpoint."""
        return {}

    # Reading ----------------------------------------------------------------------------------------------------
    def read(self, path: str, labelled: bool = True) -> list:
        """The examples of ``path``, with their labels unless ``labelled`` is False (a --predict file)."""
        raise NotImplementedError

    def read_inputs(self) -> tuple[list, list, list | None]:
        """The training, evaluation and prediction examples, each file read (format errors first), then the labels
        checked: against --labels when given, else for rare labels in the training file (--min-label-count) and, in
        the evaluation file, for labels the training file does not have. Sets ``label_names``."""
        args = self.args
        train = self.read(args.train)
        eval_examples = self.read(args.eval) if args.eval else []
        predict_examples = self.read(args.predict, labelled=False) if args.predict else None
        if self.labelled:
            train, eval_examples = self._check_labels(train, eval_examples)
        if not train:
            raise formats.TaskDataError(f"{args.train}: no usable examples")
        return train, eval_examples, predict_examples

    def _check_labels(self, train: list, eval_examples: list) -> tuple[list, list]:
        args, skip, bad = self.args, self.args.skip_bad_rows, self.bad
        if args.labels is not None:
            self.label_names = formats.parse_label_list(args.labels)
            train = formats.check_labels(train, self.label_names, skip, bad, "--labels")
            eval_examples = formats.check_labels(eval_examples, self.label_names, skip, bad, "--labels")
        else:
            train = formats.check_label_counts(train, args.min_label_count, skip, bad, args.train)
            self.label_names = sorted({label for ex in train for label, _ in formats.labels_of(ex)})
            eval_examples = formats.check_labels(eval_examples, self.label_names, skip, bad, "training labels")
        return train, eval_examples

    # Batches ----------------------------------------------------------------------------------------------------
    def features(self, examples: list) -> list:
        """What batches are made of (tokenized windows, aligned words); the examples themselves by default."""
        return examples

    def collate(self, batch: list, with_labels: bool = True) -> dict[str, torch.Tensor]:
        """A batch of features as host tensors the head takes; without label tensors when ``with_labels`` is False."""
        raise NotImplementedError

    def loss_count(self, collated: dict[str, torch.Tensor]) -> int:
        """What the head's loss over ``collated`` is a mean over (read from host tensors: no device sync)."""
        return int(collated["input_ids"].shape[0])

    # Predictions ------------------------------------------------------------------------------------------------
    def outputs(self, output) -> list:
        """The head's output for a batch, one host tensor (or tuple of them) per feature."""
        return list(output.logits.float().cpu())

    def decode(self, model, examples: list, features: list, outputs: list, with_scores: bool) -> list:
        """One prediction per example from its features' outputs; with ``with_scores``, (prediction, scores) pairs,
        ``scores`` being the dict that predictions.jsonl adds to the example's line."""
        raise NotImplementedError

    def metrics(self, examples: list, predictions: list) -> dict[str, float]:
        raise NotImplementedError

    def model_labels(self, model) -> list[str]:
        """The model's labels in id order (its ``id2label``, which a training run writes from ``label_names``)."""
        id2label = getattr(model.config, "id2label", None)
        if id2label:
            return [id2label[i] for i in range(len(id2label))]
        return self.label_names


class TableTask(Task):
    """A label per text or text pair, read from a .tsv/.csv/.jsonl table (--text-column, --pair-column,
    --label-column) and encoded by the tokenizer, truncated to --max-length; ``label_tensor`` turns the labels
    into the head's targets."""

    regression: ClassVar[bool] = False  # labels are numbers, not class names

    def read(self, path: str, labelled: bool = True) -> list:
        args = self.args
        return formats.read_text_examples(
            path,
            args.text_column,
            args.pair_column,
            args.label_column if labelled else None,
            regression=self.regression,
            skip_bad_rows=args.skip_bad_rows,
            bad=self.bad,
        )

    def collate(self, batch: list, with_labels: bool = True) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            [ex.text for ex in batch],
            [ex.pair for ex in batch] if self.args.pair_column else None,
            max_length=self.args.max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        out = {k: encoded[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
        if with_labels and batch[0].label is not None:
            out["labels"] = self.label_tensor([ex.label for ex in batch])
        return out

    def label_tensor(self, labels: list) -> torch.Tensor:
        raise NotImplementedError
