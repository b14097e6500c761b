"""``fastbert fill-mask MODEL TEXT``: the top-k tokens, with their probabilities, for each [MASK] in a text.

MODEL is an HF-format or fastbert model directory with an MLM head (``BertForPreTraining`` weights, as ``fastbert
export`` writes and BERT checkpoints hold, or a DeBERTa-v2/v3 ``DebertaV2ForMaskedLM``, by its config's
``model_type``) and its vocab.txt / tokenizer_config.json. Every [MASK] is predicted
from one forward pass over the whole text, as transformers' fill-mask pipeline does: the probabilities are the
softmax over the vocabulary of the MLM logits at the mask's position. Runs on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported when a model is used: the CLI's --help and other commands do without it
    import torch


class FillMaskError(ValueError):
    """A model or text fill-mask cannot use; the message names it."""


def load(model_dir: str | Path, device: torch.device | None = None):
    """(model, tokenizer) from ``model_dir``; a directory without a model, or a model without an MLM head (such as
    a sentence-embedding checkpoint), is a ``FillMaskError`` naming it."""
    from fastbert.model import BertForPreTraining
    from fastbert.tokenizer import WordPieceTokenizer
    from fastbert.train.distributed import default_device

    path = Path(model_dir)
    if not path.is_dir():
        raise FillMaskError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise FillMaskError(f"{path}: not a model directory (no config.json)")
    tokenizer = WordPieceTokenizer.from_pretrained(path)
    from fastbert import deberta

    cls = deberta.DebertaForPreTraining if deberta.is_deberta_dir(path) else BertForPreTraining
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing keys are checked below
        model, info = cls.from_pretrained(path, output_loading_info=True)
    # The MLM head is every ``cls.`` weight but the sentence (NSP/SOP) classifier's; the decoder is tied to the
    # word embeddings.
    head = [k for k in info.missing_keys if k.startswith("cls.") and not k.startswith("cls.sentence.")]
    if head:
        raise FillMaskError(
            f"{path}: the checkpoint has no MLM head (missing {', '.join(head[:3])}"
            f"{' ...' if len(head) > 3 else ''}); fill-mask needs a model pretrained with masked language modelling"
        )
    if model.config.vocab_size < len(tokenizer.vocab):
        raise FillMaskError(
            f"{path}: the vocabulary has {len(tokenizer.vocab)} tokens but the model only {model.config.vocab_size}"
        )
    return model.to(device or default_device()).eval(), tokenizer


def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] of ``text`` in order, its ``top_k`` candidate tokens with their probabilities (the softmax
    of the model's MLM logits at that position, computed in float32), most probable first."""
    if top_k < 1:
        raise FillMaskError(f"top_k must be at least 1, got {top_k}")
    ids = tokenizer.encode(text)
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    if not positions:
        raise FillMaskError(f"no {tokenizer.special_tokens['mask_token']} in the text: {text!r}")
    limit = model.config.max_position_embeddings
    if len(ids) > limit:
        raise FillMaskError(f"the text is {len(ids)} tokens, more than the model's {limit}")
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).prediction_logits[0, positions].float()
    probs = torch.softmax(logits[:, : len(tokenizer.vocab)], dim=-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
    return [
        list(zip(tokenizer.convert_ids_to_tokens(idx), vals, strict=True))
        for idx, vals in zip(indices, values, strict=True)
    ]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``fill-mask`` on the ``fastbert`` command's subparsers."""
    parser = subparsers.add_parser(
        "fill-mask",
        help="the most likely tokens for each [MASK] in a text",
        description="Load a model with an MLM head (HF or fastbert directory) and print, for each [MASK] in TEXT, "
        "the top-k tokens with their probabilities. Runs on the GPU when there is one.",
    )
    parser.add_argument("model", metavar="MODEL", help="model directory (config.json, weights, vocab.txt)")
    parser.add_argument("text", metavar="TEXT", help='text holding one or more [MASK], e.g. "Paris is the [MASK]."')
    parser.add_argument("--top-k", type=int, default=5, help="candidates per [MASK] (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Handler of ``fastbert fill-mask``; returns the exit status."""
    try:
        model, tokenizer = load(args.model)
        results = fill_mask(model, tokenizer, args.text, args.top_k)
    except (ValueError, OSError) as e:
        print(f"fastbert fill-mask: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        masks = [[{"token": t, "probability": p} for t, p in candidates] for candidates in results]
        print(json.dumps({"text": args.text, "masks": masks}))
        return 0
    for n, candidates in enumerate(results, 1):
        print(f"[MASK] {n}:" if len(results) > 1 else "[MASK]:")
        for token, p in candidates:
            print(f"  {p:8.4f}  {token}")
    return 0
