"""SplitMix64, the hash behind every random draw of the data pipeline (segment pairs, defined in
tests/pairing_reference.py; masking in ``fastbert.data.masking``): a draw depends only on what it is for, never
on a generator's position.

The Python twin of csrc/wordpiece/splitmix.h; the tests hold the C++ pair cutter and masker to the Python
definitions that use this module, so the two compute the same values.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: SplitMix64's increment
MASK64 = (1 << 64) - 1

UInt64 = TypeVar("UInt64", int, np.uint64, np.ndarray)


def mix64(x: UInt64) -> UInt64:
    """SplitMix64's finaliser, a bijective avalanche mix, of a Python int below 2**64 or of numpy uint64 values
    (a scalar or an array, elementwise; call it under ``np.errstate(over="ignore")`` for scalars). The masks
    keep a Python int to 64 bits and change nothing in uint64 arithmetic, which wraps by itself."""
    x = x ^ (x >> 30)
    x = (x * 0xBF58476D1CE4E5B9) & MASK64
    x = x ^ (x >> 27)
    x = (x * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)
