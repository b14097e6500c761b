"""``fastbert demo``: the whole pipeline on a corpus every machine has, in a few minutes on a CPU.

The installed Python's standard-library docstrings are the corpus (every 20th document held back); ``fastbert
train-vocab``'s trainer learns a vocabulary from the rest (the same file on every run); ``prepare-data`` makes NSP
shards; the ``tiny`` model pretrains with LAMB while the loss falls; the run is exported to HF format and its curves
plotted; and the exported model fills a [MASK] in held-back sentences.

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


@dataclass
class DemoArgs:
    out: str = "fastbert-demo"
    steps: int = 300
    vocab_size: int = 8000
    seq_len: int = 128
    global_batch: int = 32
    micro_batch: int = 32
    lr: float = 4e-3
    corpus_bytes: int = 2_000_000


def _write_corpus(out: Path, limit: int, write: bool = True) -> tuple[Path, list[str]]:
    train, held_out = [], []
    for i, paragraphs in enumerate(stdlib_documents(limit_bytes=limit)):
        (held_out if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else train).append(paragraphs)
    path = out / "corpus.txt"
    if write:
        from fastbert.atomic import write_atomic

        write_atomic(path, ("\n\n".join(" ".join(p) for p in train) + "\n").encode("utf-8"))
    return path, [p for doc in held_out for p in doc]


def unigram_loss(vocab: Path, corpus: Path, held_out: Path) -> float:
    """The baseline a masked-LM should beat: the cross-entropy (nats) of the held-out text's tokens under the training
    corpus's token frequencies (add-one smoothed), i.e. predicting every masked token without looking at its context."""
    import numpy as np

    from fastbert.tokenizer import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_vocab(vocab)
    train_ids, _ = tokenizer.encode_batch_flat(
        corpus.read_text(encoding="utf-8").split("\n\n"), add_special_tokens=False
    )
    held_ids, _ = tokenizer.encode_batch_flat(
        held_out.read_text(encoding="utf-8").split("\n\n"), add_special_tokens=False
    )
    counts = np.bincount(train_ids, minlength=len(tokenizer.vocab)).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[held_ids].mean())


def guess_masked_words(model_dir: Path, sentences: list[str], top_k: int = 5) -> list[tuple[str, str, list[str]]]:
    """For each sentence, mask its longest in-vocabulary word and return (masked text, answer, top-k guesses)."""
    from fastbert.fill_mask import fill_mask, load

    model, tokenizer = load(model_dir)
    results = []
    for sentence in sentences:
        words = sentence.split()
        candidates = [i for i, w in enumerate(words) if w.isalpha() and len(tokenizer.tokenize(w)) == 1 and len(w) > 3]
        if not candidates:
            continue
        target = max(candidates, key=lambda i: len(words[i]))
        masked = " ".join("[MASK]" if i == target else w for i, w in enumerate(words))
        if len(tokenizer.encode(masked)) > model.config.max_position_embeddings:
            continue
        with torch.no_grad():
            (guesses,) = fill_mask(model, tokenizer, masked, top_k)
        results.append((masked, words[target].lower(), [token for token, _ in guesses]))
    return results


STATE = "demo.json"


class DemoError(ValueError):
    """An --out the demo cannot use."""


def _settings(args: DemoArgs) -> dict:
    """What makes two demo runs the same run: everything but the number of steps (more steps continue it)."""
    return {**{k: v for k, v in asdict(args).items() if k not in ("out", "steps")}, "python": sys.version.split()[0]}


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
    final = _pretrain_stage(out, args, vocab, corpus)
    hf_dir = _export_stage(out)
    _fill_mask_stage(hf_dir, held_out)
    return final


def _kept(state: dict, stage: str) -> str:
    return " (done in an earlier run: kept)" if stage in state["done"] else ""


def _corpus_stage(out: Path, args: DemoArgs, state: dict) -> tuple[Path, list[str]]:
    print(f"[1/6] corpus: docstrings of the Python standard library in {os.path.dirname(os.__file__)}")
    corpus, held_out = _write_corpus(out, args.corpus_bytes, write="corpus" not in state["done"])
    if "corpus" not in state["done"]:
        _stage_done(out, state, "corpus")
    print(f"      {corpus.stat().st_size / 1e6:.1f} MB of text, {len(held_out)} paragraphs held back")
    return corpus, held_out


def _vocab_stage(out: Path, args: DemoArgs, state: dict, corpus: Path) -> Path:
    from fastbert.vocab_cli import train_vocab

    print(f"[2/6] vocabulary: fastbert train-vocab, {args.vocab_size} tokens{_kept(state, 'vocab')}")
    vocab = out / "vocab.txt"
    if "vocab" not in state["done"]:
        train_vocab([corpus], out, vocab_size=args.vocab_size, lowercase=True, min_frequency=2)
        _stage_done(out, state, "vocab")
    return vocab


def _shards_stage(out: Path, args: DemoArgs, state: dict, vocab: Path, corpus: Path, held_out: list[str]) -> None:
    """The training shards, and the held-back paragraphs as held-out shards scored during training."""
    from fastbert.data.prepare import PrepareOptions, prepare

    print(f"[3/6] shards: prepare-data (NSP, sequence length {args.seq_len}){_kept(state, 'data')}")
    options = PrepareOptions(vocab=str(vocab), seq_len=args.seq_len)
    if "data" not in state["done"]:
        prepare([str(corpus)], out / "data", options, overwrite=True)  # a partial one from an interrupted run
        _stage_done(out, state, "data")
    if "held_out" not in state["done"]:
        from fastbert.atomic import write_atomic

        write_atomic(out / "held_out.txt", ("\n\n".join(held_out) + "\n").encode("utf-8"))
        prepare([str(out / "held_out.txt")], out / "held_out", options, overwrite=True, progress=False)
        _stage_done(out, state, "held_out")
    meta = json.loads((out / "data" / "meta.json").read_text())
    print(f"      {meta['num_samples']} samples, {meta['num_tokens']} tokens")


def _pretrain_stage(out: Path, args: DemoArgs, vocab: Path, corpus: Path) -> dict:
    """Pretraining (resumed from the run's last checkpoint, if any); its held-out loss against the unigram one."""
    from fastbert.train.pretrain import PretrainArgs, pretrain

    print(f"[4/6] pretraining the tiny model for {args.steps} steps (LAMB, global batch {args.global_batch})")
    final = pretrain(
        PretrainArgs(
            data=str(out / "data"),
            out=str(out / "run"),
            model="tiny",
            steps=args.steps,
            global_batch=args.global_batch,
            micro_batch=args.micro_batch,
            lr=args.lr,
            warmup=max(1, args.steps // 10),
            save_every=max(1, args.steps // 3),
            resume="auto",
            eval_data=str(out / "held_out"),
            eval_every=max(1, args.steps // 10),
        )
    )
    baseline = unigram_loss(vocab, corpus, out / "held_out.txt")
    print(
        f"      held-out masked-word loss {final['eval_mlm_loss']:.2f} (accuracy {final['eval_mlm_accuracy']:.1%}) on "
        f"text never trained on; a model that knows only how often each token occurs scores {baseline:.2f}"
    )
    return final


def _export_stage(out: Path) -> Path:
    from fastbert.train.export import export
    from fastbert.train.plot import plot

    print("[5/6] export to HF format and plot the curves")
    hf_dir = export(out / "run", out / "hf")
    png = plot(out / "run")
    print(f"      {hf_dir} (loads with transformers.BertForPreTraining.from_pretrained), {png}")
    return hf_dir


def _fill_mask_stage(hf_dir: Path, held_out: list[str]) -> None:
    print("[6/6] filling a [MASK] in held-back sentences")
    sentences = [p.split(". ")[0] for p in held_out if 6 <= len(p.split(". ")[0].split()) <= 30][:5]
    for masked, answer, guesses in guess_masked_words(hf_dir, sentences):
        print(f"      {masked}\n        answer: {answer!r}; model's top 5: {guesses}")
