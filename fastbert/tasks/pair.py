"""``--task pair``: a class per pair of texts (the second in --pair-column, ``text_b`` by default); otherwise
``classify``."""

from __future__ import annotations

from fastbert.tasks.classify import ClassifyTask


class PairTask(ClassifyTask):
    name = "pair"

    @classmethod
    def check_args(cls, args) -> None:
        super().check_args(args)
        if not args.pair_column:
            args.pair_column = "text_b"
