"""The C++ batch encoders under concurrency and failure: several Python threads encoding at once with
vocabularies of different sizes (so the extension's cache of shared Python ints grows while other batches are
being built), and an error on a C++ worker thread, which must come back as a Python exception naming the item,
leave the cyclic GC enabled and the process alive."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from fastbert import _wordpiece
from fastbert.tokenizer import DEFAULT_SPECIAL_TOKENS, WordPieceTokenizer

# Larger than any other vocabulary in the test session, and increasing, so that each of them grows the shared-int
# cache during the test.
GROWING_SIZES = (45_000, 62_000, 70_000)


def made_up_word(k: int) -> str:
    return f"zq{k:05d}"


def tokenizer_of(tokens: list[str], name: str) -> WordPieceTokenizer:
    return WordPieceTokenizer(_wordpiece.Vocab.from_text("\n".join(tokens).encode("utf-8"), name), source=name)


@pytest.fixture(scope="module")
def real_tokens(vocab_path) -> list[str]:
    return vocab_path.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def small(real_tokens) -> WordPieceTokenizer:
    """About 270 tokens: the special tokens, characters, their continuations and the 200 most frequent words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = [*DEFAULT_SPECIAL_TOKENS.values(), *chars, *("##" + c for c in chars), *real_tokens[1996:2196]]
    return tokenizer_of(list(dict.fromkeys(tokens)), "small")


@pytest.fixture(scope="module")
def growing(real_tokens) -> list[tuple[WordPieceTokenizer, int]]:
    """bert's vocabulary plus made-up words, at each of GROWING_SIZES, with the number of made-up words."""
    out = []
    for size in GROWING_SIZES:
        extra = size - len(real_tokens)
        out.append((tokenizer_of(real_tokens + [made_up_word(k) for k in range(extra)], f"v{size}"), extra))
    return out


def test_threads_with_vocabularies_of_different_sizes_encode_as_one_text_at_a_time(
    vocab_path, real_sentences, small, growing
):
    bert = WordPieceTokenizer.from_vocab(vocab_path)
    long_batch = [s * (1 + i % 5) for i, s in enumerate(real_sentences * 40)]
    # Texts whose ids reach the top of each growing vocabulary.
    grown_batches = [
        [
            f"{s} {made_up_word((i * 7919) % extra)} {made_up_word(extra - 1 - i % 50)}"
            for i, s in enumerate(real_sentences * 20)
        ]
        for _, extra in growing
    ]

    results: list[tuple[WordPieceTokenizer, list[str], str, object]] = []
    errors: list[BaseException] = []
    started = [threading.Event(), threading.Event()]
    stop = threading.Event()

    def encode(tokenizer, texts, method):
        if method == "batch":
            return tokenizer.encode_batch(texts, num_threads=2)
        if method == "call":
            return tokenizer(texts, num_threads=2)["input_ids"]
        flat, offsets = tokenizer.encode_batch_flat(texts, num_threads=2)
        return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(texts))]

    def keep_encoding(tokenizer, texts, started_event, methods):
        try:
            calls = 0
            while not stop.is_set() or calls < 2 * len(methods):
                if calls == 1:
                    started_event.set()  # the shared ints for this vocabulary now exist
                method = methods[calls % len(methods)]
                results.append((tokenizer, texts, method, encode(tokenizer, texts, method)))
                calls += 1
        except BaseException as e:  # handed to the main thread
            errors.append(e)
            started_event.set()

    def grow():
        try:
            for event in started:
                event.wait(timeout=60)
            time.sleep(0.01)  # into the middle of the other threads' next batches
            for (tokenizer, _), texts in zip(growing, grown_batches, strict=True):
                for method in ("batch", "call", "flat"):
                    results.append((tokenizer, texts, method, encode(tokenizer, texts, method)))
        except BaseException as e:  # handed to the main thread
            errors.append(e)
        finally:
            stop.set()

    threads = [
        threading.Thread(target=keep_encoding, args=(bert, long_batch, started[0], ("batch",))),
        threading.Thread(target=keep_encoding, args=(small, long_batch, started[1], ("batch", "call"))),
        threading.Thread(target=grow),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "an encoding thread hung"
    if errors:
        raise errors[0]

    expected = {}
    for tokenizer, texts, method, got in results:
        key = (id(tokenizer), id(texts))
        if key not in expected:
            expected[key] = [tokenizer.encode(text) for text in texts]
        assert got == expected[key], (tokenizer.vocab_size, method)
    assert {tokenizer.vocab_size for tokenizer, *_ in results} == {len(bert), len(small), *GROWING_SIZES}
    top = max(max(ids) for tokenizer, _, _, got in results if tokenizer is growing[-1][0] for ids in got)
    assert top == GROWING_SIZES[-1] - 1


# A child process (a failure must not take the test run down with it) encodes a batch in which one huge word per
# chunk of rows needs more memory than an address-space limit leaves. Each chunk starts with about 1 MB of
# ordinary text, so both threads have claimed a chunk before either reaches its huge word: the allocation fails on
# the worker thread as well as on the calling thread. It reports what each call raised and whether the cyclic GC
# was enabled before and after, one line per call as it goes, then encodes once more to show it carries on.
CHILD = textwrap.dedent("""
    import gc, json, resource, sys
    from fastbert.tokenizer import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.from_vocab(sys.argv[1])
    normal = "the quick brown fox jumps over the lazy dog " * 25_000
    huge = "a" * (64 << 20)  # matching it needs 4 bytes per byte: 256 MB
    texts = ([normal, huge] + ["a short text"] * 14) * 2  # two chunks of 16 rows, so two threads

    def address_space():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmSize"))

    resource.setrlimit(resource.RLIMIT_AS, (address_space() + (256 << 20), resource.RLIM_INFINITY))
    for method in ("encode_batch", "encode_batch_flat", "__call__"):
        for threads in (1, 2):
            before = gc.isenabled()
            try:
                getattr(tokenizer, method)(texts, num_threads=threads)
                error = None
            except Exception as e:
                error = [type(e).__name__, str(e)]
            print(json.dumps({"method": method, "threads": threads, "error": error, "gc_before": before,
                              "gc_after": gc.isenabled()}), flush=True)
    print(json.dumps(tokenizer.encode_batch(["still here"], num_threads=2)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc/self/status")
def test_a_failure_on_a_worker_thread_is_raised_naming_the_item_with_the_gc_enabled(vocab_path):
    # Few threads and malloc arenas in the child, so that its address space grows only with what it encodes.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(vocab_path)], capture_output=True, text=True, timeout=300, env=env
    )
    lines = [json.loads(line) for line in child.stdout.splitlines()]
    calls = [line for line in lines if isinstance(line, dict)]
    expected = (["MemoryError", "texts[1] (67108864 bytes): out of memory while encoding it"], True, True)
    for call in calls:  # what the child reported before it died, if it did
        assert (call["error"], call["gc_before"], call["gc_after"]) == expected, call
    assert child.returncode == 0, f"the child died ({child.returncode}) after {calls}: {child.stderr[-2000:]}"
    assert [(c["method"], c["threads"]) for c in calls] == [
        (m, t) for m in ("encode_batch", "encode_batch_flat", "__call__") for t in (1, 2)
    ]
    assert lines[-1] == [[101, 2145, 2182, 102]]
