"""Fine-tuning tasks: file formats (``formats``), features and answer decoding (``features``), metrics
(``metrics``), one ``Task`` per file (``base`` says what a task owns), and ``TASKS``, the one list of them.

Adding a task is a new file with a ``Task`` subclass and one line here; ``fastbert finetune --task`` takes its name.
"""

from __future__ import annotations

from fastbert.tasks.base import Task
from fastbert.tasks.classify import ClassifyTask
from fastbert.tasks.ner import NerTask
from fastbert.tasks.pair import PairTask
from fastbert.tasks.qa import QATask
from fastbert.tasks.regress import RegressTask

TASKS: dict[str, type[Task]] = {
    ClassifyTask.name: ClassifyTask,
    PairTask.name: PairTask,
    RegressTask.name: RegressTask,
    NerTask.name: NerTask,
    QATask.name: QATask,
}
