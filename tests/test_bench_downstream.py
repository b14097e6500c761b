"""The time-to-quality benchmark's downstream evaluation (benchmarks/downstream.py): its splits, its learning-rate
choice on the dev split, its statistics and its regressions."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import downstream as ds  # noqa: E402


def chapters() -> list[tuple[str, str]]:
    """Old Testament 'Gen' (training) and 'Ruth' (held out), New Testament 'Mat' (training) and 'Jas' (held out):
    verses of 10 words drawn from 40, with punctuation, each naming its book."""
    rng = np.random.default_rng(3)
    words = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(40)]

    def verses(book: str, n: int) -> str:
        return "\n".join(f"And {book} said, {' '.join(rng.choice(words, 8))}: Go." for _ in range(n))

    return [
        ("Gen", verses("gen", 60)),
        ("Ruth", verses("ruth", 30)),
        ("Mat", verses("mat", 50)),
        ("Jas", verses("jas", 20)),
    ]


def test_testament_splits_are_disjoint_train_dev_from_training_books_and_balanced_held_out_test():
    task = ds.testament_task(chapters(), per_class=30, dev_per_class=10)
    assert [len(c) for c in task.train] == [30, 30]
    assert all(v.startswith("And gen") for v in task.train[0]) and all(v.startswith("And mat") for v in task.train[1])
    dev = {v for v, _ in task.dev}
    assert len(task.dev) == 20 and not dev & set(task.train[0] + task.train[1])
    assert Counter(label for _, label in task.test) == {0: 20, 1: 20}  # every verse of the smaller held-out side
    assert all(v.startswith("And ruth" if label == 0 else "And jas") for v, label in task.test)
    low = task.train_rows(5)
    assert Counter(label for _, label in low) == {0: 5, 1: 5}
    assert {v for v, _ in low} == set(task.train[0][:5] + task.train[1][:5])  # the first of the full set
    assert ds.testament_task(chapters(), per_class=30, dev_per_class=10) == task  # seeded
    with pytest.raises(ValueError, match="fewer than"):
        ds.testament_task(chapters(), per_class=45, dev_per_class=10)


def test_word_order_pairs_each_verse_once_and_only_order_differs():
    task = ds.word_order_task(chapters(), per_class=20, dev_per_class=10, test_per_class=10)
    source = {" ".join(ds._words(v)) for _, text in chapters() for v in text.split("\n")}
    bags = {tuple(sorted(s.split())) for s in source}
    shuffled = task.train[0] + [t for t, c in task.dev if c == 0] + [t for t, c in task.test if c == 0]
    original = task.train[1] + [t for t, c in task.dev if c == 1] + [t for t, c in task.test if c == 1]
    assert all(t in source for t in original)
    assert all(t not in source and tuple(sorted(t.split())) in bags for t in shuffled)
    assert all(t == t.lower() and "," not in t and ":" not in t and "." not in t for t in shuffled + original)
    used = [tuple(sorted(t.split())) for t in shuffled + original]
    assert len(used) == len(set(used))  # no verse in both classes, nor twice
    assert all({"ruth", "jas"} & set(t.split()) for t, _ in task.test)
    assert not any({"ruth", "jas"} & set(t.split()) for t in task.train[0] + task.train[1])


def test_tuned_chooses_the_rate_on_the_mean_dev_of_three_seeds_and_reports_test_over_the_seeds_at_it():
    calls = []
    lo, mid, hi = ds.GRID

    def run(lr, seed):
        calls.append((lr, seed))
        # Seed 0 alone would choose hi; the mean over seeds 0..2 chooses mid (0.70 against 0.65 and 0.60).
        dev = {lo: [0.6, 0.6, 0.6], mid: [0.7, 0.7, 0.7], hi: [0.75, 0.6, 0.6]}[lr][seed] if seed < 3 else 0.0
        test = {lo: 0.9, mid: 0.5, hi: 0.95}[lr] + 0.01 * seed  # test would pick another rate
        return {"dev": dev, "test": test}

    r = ds.tuned(run, seeds=5)
    assert r["lr"] == mid
    assert calls[:9] == [(lr, s) for lr in (lo, mid, hi) for s in range(3)]
    assert calls[9:] == [(mid, 3), (mid, 4)]
    assert r["dev_by_lr"] == pytest.approx({f"{lo:g}": 0.6, f"{mid:g}": 0.7, f"{hi:g}": 0.65})
    assert r["dev_runs_by_lr"][f"{hi:g}"] == [0.75, 0.6, 0.6]
    assert r["test"]["runs"] == pytest.approx([0.5, 0.51, 0.52, 0.53, 0.54])
    assert r["test"]["mean"] == pytest.approx(0.52)
    assert r["test"]["se"] == pytest.approx(np.std([0.5, 0.51, 0.52, 0.53, 0.54], ddof=1) / math.sqrt(5))
    assert ds.tuned(run, seeds=5, choose_on=1)["lr"] == hi  # what one seed's dev score chose
    tie = ds.tuned(lambda lr, seed: {"dev": 0.5, "test": lr}, seeds=2)
    assert tie["lr"] == lo  # the lowest rate on a tie
    assert len(tie["test"]["runs"]) == 2  # fewer seeds than CHOOSE_ON: every seed chooses


def test_tune_runs_every_settings_grid_then_every_settings_seeds_as_one_at_a_time_would():
    """``tune`` batches the jobs (all grids, then all further seeds) for parallel workers; each setting's result is
    what ``tuned`` gives it alone."""
    lo, mid, hi = ds.GRID
    dev = {"a": {lo: 0.6, mid: 0.7, hi: 0.65}, "b": {lo: 0.8, mid: 0.7, hi: 0.8}}

    def run(name, lr, seed):
        return {"dev": dev[name][lr] + 0.001 * seed, "test": lr + 0.01 * seed + (name == "b")}

    batches = []

    def run_jobs(jobs):
        batches.append(list(jobs))
        return [run(*job) for job in jobs]

    out = ds.tune(["a", "b"], run_jobs, seeds=4, choose_on=2)
    assert batches == [
        [(n, lr, s) for n in ("a", "b") for lr in (lo, mid, hi) for s in (0, 1)],
        [("a", mid, 2), ("a", mid, 3), ("b", lo, 2), ("b", lo, 3)],
    ]
    for name in ("a", "b"):
        assert out[name] == ds.tuned(lambda lr, seed, name=name: run(name, lr, seed), seeds=4, choose_on=2)


def test_length_grouped_batches_keep_every_row_once_and_cut_padding():
    import random

    draw = random.Random(7)
    lengths = [draw.randint(3, 64) for _ in range(1000)]
    data = ds.Encoded([[1] * n for n in lengths], [0] * len(lengths))
    batches = ds.length_grouped_batches(data, 32, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == -(-1000 // 32) and all(len(b) == 32 for b in batches if len(b) != 1000 % 32)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    rows = list(range(1000))
    random.Random(0).shuffle(rows)
    unsorted = sum(len(rows[s : s + 32]) * max(lengths[i] for i in rows[s : s + 32]) for s in range(0, 1000, 32))
    assert padded < 0.75 * unsorted
    again = ds.length_grouped_batches(data, 32, random.Random(0))
    assert again == batches and ds.length_grouped_batches(data, 32, random.Random(1)) != batches  # seeded
    assert ds.by_length(data) == sorted(range(1000), key=lambda i: lengths[i])


def test_gain_is_the_difference_of_means_with_the_combined_standard_error():
    g = ds.gain({"mean": 0.80, "se": 0.01}, {"mean": 0.74, "se": 0.02})
    assert g["points"] == pytest.approx(6.0) and g["se_points"] == pytest.approx(100 * math.sqrt(5e-4))
    assert g["beyond_2se"]
    assert not ds.gain({"mean": 0.76, "se": 0.01}, {"mean": 0.74, "se": 0.02})["beyond_2se"]


def test_bag_of_words_is_at_chance_on_shuffles_and_finds_a_telling_word():
    rng = np.random.default_rng(0)
    words = [list(rng.integers(1000, 1100, 10)) for _ in range(400)]
    # class 1 a sequence as drawn, class 0 another sequence reversed: the same bags in both classes
    rows = [([101, *w, 102] if i % 2 else [101, *w[::-1], 102], i % 2) for i, w in enumerate(words)]
    order = ds.Encoded([r for r, _ in rows], [c for _, c in rows])

    def split(data, a, b):
        return ds.Encoded(data.ids[a:b], data.labels[a:b])

    splits = {"train": split(order, 0, 240), "dev": split(order, 240, 320), "test": split(order, 320, 400)}
    assert abs(ds.bag_of_words(splits, 2)["test"] - 0.5) < 0.15
    telling = ds.Encoded([[101, *w, 2000 + c, 102] for w, c in zip(words, order.labels, strict=True)], order.labels)
    splits = {k: split(telling, *r) for k, r in {"train": (0, 240), "dev": (240, 320), "test": (320, 400)}.items()}
    assert ds.bag_of_words(splits, 2)["test"] == 1.0


def test_logistic_regression_picks_the_l2_weight_by_dev_accuracy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    split = {"train": slice(0, 200), "dev": slice(200, 250), "test": slice(250, 300)}
    r = ds.logistic_regression({k: x[s] for k, s in split.items()}, {k: y[s] for k, s in split.items()}, 2)
    assert r["l2"] in ds.L2_GRID and r["test"] > 0.85
    noise = {k: rng.normal(size=(50 if k != "train" else 200, 5)) for k in split}
    chance = ds.logistic_regression(noise, {k: y[s] for k, s in split.items()}, 2)
    assert chance["test"] < 0.75
