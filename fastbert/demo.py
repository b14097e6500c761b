"""``fastbert demo``: the whole pipeline on a corpus every machine has, in a few minutes on a CPU.

The installed Python's standard-library docstrings are the corpus (every 20th document held back, and every
document that contains one of the fill-mask probes); ``fastbert train-vocab``'s trainer learns a vocabulary from the
rest (the same file on every run); ``prepare-data`` makes masked-LM shards; the shipped short-budget recipe
(``fastbert/recipes/short-budget.json``, ``deberta-tiny``) pretrains for a time budget (4 minutes by default); the
run is exported to HF format and its curves plotted; its held-out masked-LM loss is printed beside a unigram and a
bigram count model's on the same masks; and the model fills the [MASK] of a few fixed probe sentences.

Run again in the same directory, it picks up where it stopped: ``demo.json`` records the settings and the stages
done (corpus, vocabulary, shards), and pretraining resumes from the run's last checkpoint. A directory that holds
something else, or a demo with other settings, is refused rather than mixed with a new run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastbert.data.corpus import stdlib_documents

HOLD_OUT_EVERY = 20


RECIPE = "short-budget"
# Fill-mask probes: sentences in the corpus's register, the answer each [MASK] hides. A corpus document that contains
# a probe's sentence is held back, so the model never trains on one.
PROBES = (
    ("Return a new [MASK] containing the items of the iterable.", "list"),
    ("If the file does not [MASK], an error is raised.", "exist"),
    ("This function is deprecated and will be [MASK] in a future version.", "removed"),
    ("Return True if the string is [MASK], False otherwise.", "empty"),
    ("The optional [MASK] argument defaults to None.", "timeout"),
)


@dataclass
class DemoArgs:
    out: str = "fastbert-demo"
    budget: str = "4m"
    steps: int | None = None
    vocab_size: int = 8000
    # 64, not the benchmark's 128: in 4 minutes on 2 cores (one seed each), the recipe on 64-token samples took 377
    # steps against 162 and scored 6.859 nats on a dev text no run trains on (Debian's computers, linux and science
    # fortunes) against 7.043 (6.838 against 7.008 on rows of 128).
    seq_len: int = 64
    corpus_bytes: int = 2_000_000


def _holds_probe(paragraphs: list[str]) -> bool:
    text = " ".join(" ".join(paragraphs).split()).lower()
    return any(sentence.replace("[MASK]", answer).lower() in text for sentence, answer in PROBES)


def _write_corpus(out: Path, limit: int) -> tuple[Path, Path]:
    """The training text (``corpus.txt``: a document a paragraph block) and the held-back paragraphs
    (``held_out.txt``), written atomically."""
    from fastbert.atomic import write_atomic

    train, held_out = [], []
    for i, paragraphs in enumerate(stdlib_documents(limit_bytes=limit)):
        hold = i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 or _holds_probe(paragraphs)
        (held_out if hold else train).append(paragraphs)
    write_atomic(out / "held_out.txt", ("\n\n".join(p for doc in held_out for p in doc) + "\n").encode("utf-8"))
    write_atomic(out / "corpus.txt", ("\n\n".join(" ".join(p) for p in train) + "\n").encode("utf-8"))
    return out / "corpus.txt", out / "held_out.txt"


def held_out_scores(model_dir: Path, vocab: Path, corpus: Path, held_out: Path, seq_len: int) -> dict:
    """The model's held-out masked-LM loss and the unigram and bigram count models' on the same fixed masks (15% of
    the held-out tokens, BERT's 80/10/10 rule, seed 0), from ``fastbert.train.baselines``."""
    import numpy as np

    from fastbert.fill_mask import load
    from fastbert.tokenizer import WordPieceTokenizer
    from fastbert.train.baselines import count_baselines, fixed_masks, masked_lm_loss

    tokenizer = WordPieceTokenizer.from_vocab(vocab)
    train_docs = [
        np.asarray(tokenizer.encode(doc, add_special_tokens=False), dtype=np.int64)
        for doc in corpus.read_text(encoding="utf-8").split("\n\n")
        if doc.strip()
    ]
    held_ids, _ = tokenizer.encode_batch_flat(
        held_out.read_text(encoding="utf-8").split("\n\n"), add_special_tokens=False
    )
    cls, sep, mask = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "[MASK]"])
    size = len(tokenizer.vocab)
    masks = fixed_masks(np.asarray(held_ids), seq_len, cls, sep, mask, size, seed=0)
    model, _ = load(model_dir)
    return {
        "model": masked_lm_loss(model, masks),
        **count_baselines(train_docs, masks, size, mask),
        "masked_tokens": int((masks.labels != -100).sum()),
    }


def fill_probes(model_dir: Path, top_k: int = 5) -> list[tuple[str, str, list[str]]]:
    """(probe, answer, the model's top-k tokens for its [MASK]) for each of ``PROBES``."""
    from fastbert.fill_mask import fill_mask, load

    model, tokenizer = load(model_dir)
    results = []
    for sentence, answer in PROBES:
        with torch.no_grad():
            (guesses,) = fill_mask(model, tokenizer, sentence, top_k)
        results.append((sentence, answer, [token for token, _ in guesses]))
    return results


STATE = "demo.json"


class DemoError(ValueError):
    """An --out the demo cannot use."""


def _settings(args: DemoArgs) -> dict:
    """What makes two demo runs the same run: everything but its length (a longer budget or more steps continue
    it)."""
    keep = {k: v for k, v in asdict(args).items() if k not in ("out", "steps", "budget")}
    return {**keep, "recipe": _recipe(), "python": sys.version.split()[0]}


def _recipe() -> dict:
    from fastbert import recipes

    return json.loads(recipes.path(RECIPE).read_text())


def _load_state(out: Path, args: DemoArgs) -> dict:
    state_path = out / STATE
    if not state_path.exists():
        if out.is_dir() and any(out.iterdir()):
            raise DemoError(
                f"--out {out} is not empty and holds no {STATE}: not a demo directory; choose another --out"
            )
        return {"settings": _settings(args), "done": []}
    try:
        state = json.loads(state_path.read_text())
        recorded = state["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise DemoError(f"{state_path}: unreadable ({e}); remove {out} or choose another --out") from e
    if recorded != _settings(args):
        changed = sorted(k for k in set(recorded) | set(_settings(args)) if recorded.get(k) != _settings(args).get(k))
        raise DemoError(f"--out {out} holds a demo with other settings ({', '.join(changed)}); choose another --out")
    return state


def _stage_done(out: Path, state: dict, stage: str) -> None:
    from fastbert.atomic import write_atomic

    state["done"].append(stage)
    write_atomic(out / STATE, (json.dumps(state, indent=1) + "\n").encode())


def run_demo(args: DemoArgs) -> dict:
    out = Path(args.out)
    state = _load_state(out, args)
    out.mkdir(parents=True, exist_ok=True)
    corpus, held_out = _corpus_stage(out, args, state)
    vocab = _vocab_stage(out, args, state, corpus)
    _shards_stage(out, args, state, vocab, corpus, held_out)
    final = _pretrain_stage(out, args)
    hf_dir = _export_stage(out)
    final["held_out"] = _quality_stage(out, args, hf_dir, vocab, corpus)
    return final


def _kept(state: dict, stage: str) -> str:
    return " (done in an earlier run: kept)" if stage in state["done"] else ""


def _corpus_stage(out: Path, args: DemoArgs, state: dict) -> tuple[Path, Path]:
    where = os.path.dirname(os.__file__)
    print(f"[1/6] corpus: docstrings of the Python standard library in {where}{_kept(state, 'corpus')}")
    corpus, held_out = out / "corpus.txt", out / "held_out.txt"
    if "corpus" not in state["done"] or not held_out.is_file():  # a demo before held_out.txt was written here
        corpus, held_out = _write_corpus(out, args.corpus_bytes)
        if "corpus" not in state["done"]:
            _stage_done(out, state, "corpus")
    paragraphs = held_out.read_text(encoding="utf-8").count("\n\n") + 1
    print(f"      {corpus.stat().st_size / 1e6:.1f} MB of text, {paragraphs} paragraphs held back")
    return corpus, held_out


def _vocab_stage(out: Path, args: DemoArgs, state: dict, corpus: Path) -> Path:
    from fastbert.vocab_cli import train_vocab

    print(f"[2/6] vocabulary: fastbert train-vocab, {args.vocab_size} tokens{_kept(state, 'vocab')}")
    vocab = out / "vocab.txt"
    if "vocab" not in state["done"]:
        train_vocab([corpus], out, vocab_size=args.vocab_size, lowercase=True, min_frequency=2)
        _stage_done(out, state, "vocab")
    return vocab


def _shards_stage(out: Path, args: DemoArgs, state: dict, vocab: Path, corpus: Path, held_out: Path) -> None:
    """The training shards, and the held-back paragraphs as held-out shards scored during training."""
    from fastbert.data.prepare import PrepareOptions, prepare

    print(f"[3/6] shards: prepare-data (masked LM, sequence length {args.seq_len}){_kept(state, 'data')}")
    options = PrepareOptions(vocab=str(vocab), seq_len=args.seq_len, objective="none")
    if "data" not in state["done"]:
        prepare([str(corpus)], out / "data", options, overwrite=True)  # a partial one from an interrupted run
        _stage_done(out, state, "data")
    if "held_out" not in state["done"]:
        prepare([str(held_out)], out / "held_out", options, overwrite=True, progress=False)
        _stage_done(out, state, "held_out")
    meta = json.loads((out / "data" / "meta.json").read_text())
    print(f"      {meta['num_samples']} samples, {meta['num_tokens']} tokens")


def _pretrain_stage(out: Path, args: DemoArgs) -> dict:
    """Pretraining with the short-budget recipe (resumed from the run's last checkpoint, if any)."""
    from fastbert.train.pretrain import PretrainArgs, pretrain

    recipe = _recipe()
    cap = f", at most {args.steps} steps" if args.steps is not None else ""
    print(
        f"[4/6] pretraining {recipe['model']} for {args.budget}{cap}: the {RECIPE} recipe ({recipe['optimizer']} "
        f"{recipe['lr']:g}, pre-LN {recipe['pre_ln']}, dropout {recipe['dropout']:g}, masking "
        f"{recipe['mask_rate']:.0%})"
    )
    final = pretrain(
        PretrainArgs(
            **{**recipe, "budget": args.budget},
            data=str(out / "data"),
            out=str(out / "run"),
            steps=args.steps,
            save_every=50,
            resume="auto",
            eval_data=str(out / "held_out"),
        )
    )
    print(f"      {final['step']} steps")
    return final


def _export_stage(out: Path) -> Path:
    from fastbert.train.export import export
    from fastbert.train.plot import plot

    print("[5/6] export to HF format and plot the curves")
    hf_dir = export(out / "run", out / "hf")
    png = plot(out / "run")
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    print(f"      {hf_dir} (model_type {model_type}: transformers' AutoModelForMaskedLM loads it), {png}")
    return hf_dir


def _quality_stage(out: Path, args: DemoArgs, hf_dir: Path, vocab: Path, corpus: Path) -> dict:
    print("[6/6] held-out masked-LM loss beside count models of the training text, and fill-mask probes")
    scores = held_out_scores(hf_dir, vocab, corpus, out / "held_out.txt", args.seq_len)
    print(
        f"      on {scores['masked_tokens']} masked tokens of text never trained on: this model "
        f"{scores['model']:.3f} nats; a unigram count model (token frequencies) {scores['unigram']:.3f}; a bigram "
        f"count model (the token on the left) {scores['bigram']:.3f}"
    )
    for sentence, answer, guesses in fill_probes(hf_dir):
        print(f"      {sentence}\n        answer: {answer!r}; model's top 5: {guesses}")
    return scores
