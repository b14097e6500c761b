"""Shipped ``--config`` files: ``fastbert pretrain --config short-budget`` reads ``short-budget.json`` here (flags on
the command line still override it). README.md ("A short-budget recipe") gives each choice's evidence."""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in DIRECTORY.glob("*.json"))


def path(name: str) -> Path | None:
    """The shipped recipe called ``name``, or None."""
    candidate = DIRECTORY / f"{name}.json"
    return candidate if "/" not in name and candidate.is_file() else None
