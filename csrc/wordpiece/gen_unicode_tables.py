"""Generates unicode_tables.inc: the per-code-point facts BERT's basic tokenizer needs, as C++ lookup tables.

Why the data comes from the reference tokenizer and not from one Unicode Character Database: HF `tokenizers` (the
tokenizer whose ids we must reproduce) mixes Unicode versions: its punctuation, control and nonspacing-mark tests
use category tables older than Unicode 10 (U+2E43, punctuation since Unicode 10, is a letter to it), while its
lowercasing (Rust's standard library) knows letters added in Unicode 16, and Python's `unicodedata` here is yet
another version. No single UCD reproduces that mix, so this script asks the reference's own normalizer and
pre-tokenizer about every code point, one at a time, and reports in the output's header how far the answers are
from Python's `unicodedata`.

Facts per code point (after `clean_text`, before lowercasing, as BertNormalizer orders them):
  REMOVE  dropped by clean_text (NUL, U+FFFD, controls, format characters, private use)
  SPACE   turned into a space by clean_text (and a word boundary)
  CJK     an ideograph that handle_chinese_chars surrounds with spaces
  PUNCT   isolated as its own word by BertPreTokenizer
and the uncased mapping (NFD, drop nonspacing marks, lowercase) when it is not the identity.

Usage: python csrc/wordpiece/gen_unicode_tables.py [OUTPUT]   (default: unicode_tables.inc beside this script)
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

REMOVE, SPACE, CJK, PUNCT = 1, 2, 4, 8
BLOCK = 256
MAX_CP = 0x110000


def probe() -> tuple[list[int], dict[int, str]]:
    """Per code point flags and the uncased mapping, as the reference tokenizer applies them."""
    from tokenizers import normalizers, pre_tokenizers

    clean = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=False
    )
    chinese = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    uncased = normalizers.BertNormalizer(
        clean_text=False, handle_chinese_chars=False, strip_accents=None, lowercase=True
    )
    pre = pre_tokenizers.BertPreTokenizer()
    flags = [0] * MAX_CP
    mapping: dict[int, str] = {}
    for cp in range(MAX_CP):
        if 0xD800 <= cp <= 0xDFFF:
            continue  # surrogates are not characters; valid UTF-8 never holds them
        c = chr(cp)
        cleaned = clean.normalize_str(c)
        if cleaned == "":
            flags[cp] |= REMOVE
        elif cleaned == " " and c != " " or c == " ":
            flags[cp] |= SPACE
        elif cleaned != c:
            raise RuntimeError(f"clean_text maps U+{cp:04X} to {cleaned!r}; the tables cannot express that")
        if chinese.normalize_str(c) == f" {c} ":
            flags[cp] |= CJK
        if not flags[cp] & SPACE and len(pre.pre_tokenize_str(f"a{c}a")) == 3:
            flags[cp] |= PUNCT
        lowered = uncased.normalize_str(c)
        if lowered != c:
            mapping[cp] = lowered
    return flags, mapping


def report_differences(flags: list[int], mapping: dict[int, str]) -> list[str]:
    """Where the reference departs from Python's unicodedata, summarised (goes into the generated header)."""
    counts = {
        "punctuation unknown to the reference": 0,
        "punctuation only to the reference": 0,
        "unassigned (Cn) kept, not dropped as control": 0,
        "mapping differs from unicodedata": 0,
    }
    for cp in range(MAX_CP):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        cat = unicodedata.category(c)
        is_punct = cat.startswith("P") or (33 <= cp <= 126 and not c.isalnum())
        if is_punct and not flags[cp] & PUNCT:
            counts["punctuation unknown to the reference"] += 1
        if flags[cp] & PUNCT and not is_punct:
            counts["punctuation only to the reference"] += 1
        if cat == "Cn" and not flags[cp] & REMOVE:
            counts["unassigned (Cn) kept, not dropped as control"] += 1
        expected = "".join(x for x in unicodedata.normalize("NFD", c) if unicodedata.category(x) != "Mn").lower()
        if mapping.get(cp, c) != expected:
            counts["mapping differs from unicodedata"] += 1
    return [f"{name}: {n} code points" for name, n in counts.items()]


def two_stage(values: list[int]) -> tuple[list[int], list[int]]:
    """Splits a per-code-point array into a block index and deduplicated 256-entry blocks."""
    index, blocks, seen = [], [], {}
    for start in range(0, MAX_CP, BLOCK):
        block = tuple(values[start : start + BLOCK])
        if block not in seen:
            seen[block] = len(blocks)
            blocks.append(block)
        index.append(seen[block])
    return index, [v for block in blocks for v in block]


def c_array(ctype: str, name: str, values: list[int], per_line: int = 24) -> str:
    lines = [f"inline constexpr {ctype} {name}[{len(values)}] = {{"]
    for i in range(0, len(values), per_line):
        lines.append("    " + ",".join(str(v) for v in values[i : i + per_line]) + ",")
    lines.append("};")
    return "\n".join(lines)


def render() -> str:
    import tokenizers

    flags, mapping = probe()
    pool = bytearray()
    entries = [0]  # entry 0 means "maps to itself"
    entry_of: dict[str, int] = {}
    map_values = [0] * MAX_CP
    for cp in sorted(mapping):
        target = mapping[cp]
        if target not in entry_of:
            encoded = target.encode("utf-8")
            if len(encoded) > 255:
                raise RuntimeError(f"mapping of U+{cp:04X} is {len(encoded)} bytes long")
            entry_of[target] = len(entries)
            entries.append(len(pool) << 8 | len(encoded))
            pool += encoded
        map_values[cp] = entry_of[target]
    if len(entries) >= 1 << 16:
        raise RuntimeError(f"{len(entries)} distinct mappings do not fit a uint16 index")
    flag_index, flag_blocks = two_stage(flags)
    map_index, map_blocks = two_stage(map_values)
    notes = "\n".join(f"//   {line}" for line in report_differences(flags, mapping))
    return f"""// GENERATED by gen_unicode_tables.py from tokenizers {tokenizers.__version__}; do not edit by hand.
// Python's unicodedata is Unicode {unicodedata.unidata_version}; the reference departs from it here:
{notes}
#pragma once

#include <cstdint>

namespace fastbert::unicode {{

inline constexpr uint8_t kRemove = {REMOVE}, kSpace = {SPACE}, kCjk = {CJK}, kPunct = {PUNCT};

// flags(cp) = kFlagBlocks[kFlagIndex[cp >> 8] * 256 + (cp & 255)]
{c_array("uint16_t", "kFlagIndex", flag_index)}
{c_array("uint8_t", "kFlagBlocks", flag_blocks, 48)}

// Uncased mapping: entry = kMapBlocks[kMapIndex[cp >> 8] * 256 + (cp & 255)]; 0 keeps the code point, otherwise
// kMapEntries[entry] = offset << 8 | length of the replacement's UTF-8 bytes in kMapPool (length 0 drops it).
{c_array("uint16_t", "kMapIndex", map_index)}
{c_array("uint16_t", "kMapBlocks", map_blocks)}
{c_array("uint32_t", "kMapEntries", entries, 12)}
{c_array("uint8_t", "kMapPool", list(pool), 32)}

}}  // namespace fastbert::unicode
"""


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("unicode_tables.inc")
    text = render()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
