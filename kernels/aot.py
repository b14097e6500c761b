"""Ahead-of-time compile of every kernel configuration the launchers can pick, for GPUs this machine may lack.

Owns the list of targets and the resource table. Each kernel module's ``aot_specs()`` is generated from the same
``launch_meta`` function its launchers pass to the kernels (every input dtype, every flag, every tile its
``config`` can return, ``UPCAST=False`` as on a GPU); for each spec and target this runs ``triton.compile`` down
to a cubin with the ptxas bundled in the triton wheel, and reads registers and spilled bytes from the ptxas log and
shared memory from the compiled metadata. It catches what the interpreter accepts and a GPU would reject (dots
below 16 wide, loop-carried type changes, register spills, shared memory beyond the device's limit, which is
otherwise only checked at launch). It does not launch anything.

Each row also records how often the cubin's SASS holds the opcodes the machine-code checks look for (tensor-core
MMA, global loads by width; ``cuobjdump`` from the triton wheel), and the hash of the sources it was compiled from
(``source_hash``: the kernel's module, the helpers every module shares, this file, the triton version). A row is
fresh while its spec is still one the launchers make and its hash still matches: the committed table
(``TABLE``) is checked that way by the tests, which compile nothing unless ``FASTBERT_AOT_FULL=1`` asks them to
compile everything; ``REFRESH`` brings a stale table up to date, recompiling only the stale rows.

Run ``python -m fastbert.kernels.aot --out FILE`` with ``TRITON_INTERPRET`` unset (under the interpreter
``triton.jit`` gives functions that cannot be compiled). Triton's cache is pointed at a fresh directory so that
ptxas really runs and its log is there to read. Compiles run in ``--jobs`` processes. ``--update`` compiles only
the rows of ``FILE`` that are missing or stale, keeps the fresh ones and drops those of specs no launch makes any
more. With ``--modules`` naming some modules, their rows replace those of the same modules in an existing
``FILE`` and the other modules' fresh rows stay; ``--select`` compiles only the named specs (``spec_id``);
``--cubins DIR`` keeps each cubin as ``DIR/<spec_id>.<variant>.sm_<arch>.cubin``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("bias_gelu", "residual_layer_norm", "mlm_loss", "attention", "lamb", "disentangled_attention")
# name -> (arch, shared memory per block the kernel may use at most, in bytes)
TARGETS = {"H100 (sm_90)": (90, 227 * 1024), "A100 (sm_80)": (80, 163 * 1024)}
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_80 and sm_90, the most one block can hold
MAX_REGISTERS = 255  # per thread
REGISTER_GRANULE = 8  # registers are allocated per thread in multiples of this (256 per warp)

_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# One SASS instruction line of ``cuobjdump -sass``: its opcode, past an optional predicate.
_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)
OPCODE_FAMILIES = ("HMMA", "HGMMA", "LDG")  # what the table records of each cubin's SASS, for the machine-code checks

HERE = Path(__file__).resolve().parent
SHARED_SOURCES = ("_common.py", "downcast.py", "aot.py")  # what every module's compiles depend on besides its own
TABLE = HERE.parent / "benchmarks" / "results" / "kernel_resources.json"  # the committed table, in a source checkout
REFRESH = "python -m fastbert.kernels.aot --update --out benchmarks/results/kernel_resources.json"


def register_cap(num_warps: int) -> int:
    """The most registers a thread of a ``num_warps`` block can get: the block must fit the register file."""
    per_thread = REGISTER_FILE // (32 * num_warps)
    return min(MAX_REGISTERS, per_thread - per_thread % REGISTER_GRANULE)


@functools.cache
def specs(module: str) -> list[dict]:
    return importlib.import_module(f"fastbert.kernels.{module}").aot_specs()


def spec_id(spec: dict) -> str:
    """A stable file-name-safe name of one spec: its kernel and a hash of what makes the compile distinct."""
    from fastbert.kernels._common import spec_key

    return f"{spec['fn'].__name__}-{hashlib.sha1(repr(spec_key(spec)).encode()).hexdigest()[:12]}"


def cubin_name(spec: str, arch: int, variant: str = "aligned") -> str:
    return f"{spec}.{variant}.sm_{arch}.cubin"


def source_hash(module: str) -> str:
    """The hash a fresh row of ``module`` carries: its source file, the other kernel files it takes jit helpers
    from (its ``AOT_SOURCES``), the shared sources and the triton version."""
    digest = hashlib.sha256(triton_version().encode())
    borrowed = getattr(importlib.import_module(f"fastbert.kernels.{module}"), "AOT_SOURCES", ())
    for name in (f"{module}.py", *borrowed, *SHARED_SOURCES):
        digest.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return digest.hexdigest()[:16]


def cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def sass_opcodes(cubin: bytes) -> dict[str, int]:
    """How often each opcode of ``OPCODE_FAMILIES`` (``HMMA.16816.F32``, ``LDG.E.128``, ...) occurs in the SASS of
    ``cubin``, disassembled with the cuobjdump bundled in the triton wheel."""
    import collections
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump()), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    opcodes = _OPCODE.findall(sass)
    if not opcodes:
        raise RuntimeError("aot: no instructions parsed from cuobjdump -sass")
    counts = collections.Counter(op for op in opcodes if op.split(".")[0] in OPCODE_FAMILIES)
    return dict(sorted(counts.items()))


def count(opcodes: dict[str, int], family: str) -> int:
    """Instructions of ``family`` (an opcode, with or without modifiers: ``HMMA``, ``LDG.E.128``) in a row's
    ``opcodes``; ``LDG.E.128`` counts ``LDG.E.128`` and ``LDG.E.128.CONSTANT``, not ``LDG.E.64``."""
    return sum(n for op, n in opcodes.items() if op == family or op.startswith(family + "."))


def compile_spec(spec: dict, arch: int, variant: str = "aligned") -> tuple[dict, bytes]:
    """Compile one spec (from a module's ``aot_specs()``) for ``arch`` in ``variant`` (one of its
    ``variants``); returns its row of the resource table and the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    signature = dict(spec["signature"])
    for name in fn.arg_names:
        if name not in signature:
            if name not in spec["constexprs"]:
                raise ValueError(f"aot: {fn.__name__} argument {name!r} has neither a type nor a constexpr value")
            signature[name] = "constexpr"
    # As the launcher sees them: pointers 16-byte aligned and, in the aligned variant, the integers in
    # ``aligned`` (row strides and lengths) multiples of 16, which triton's JIT specializes on.
    if variant not in spec["variants"]:
        raise ValueError(f"aot: {fn.__name__} has no {variant} variant")
    divisible = spec["aligned"] if variant == "aligned" else ()
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or name in divisible
    }
    source = ASTSource(fn, signature, spec["constexprs"], aligned)
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    used, spills = _USED.findall(text), _SPILLS.findall(text)
    if not used or not spills:
        raise RuntimeError(f"aot: no ptxas resource line for {fn.__name__} (is the triton cache warm?):\n{text}")
    cubin = compiled.asm["cubin"]
    row = {
        "kernel": fn.__name__,
        "config": spec["config"],
        "arch": f"sm_{arch}",
        "variant": variant,
        "registers": int(used[-1]),
        "register_cap": register_cap(spec["num_warps"]),
        "spill_stores": int(spills[-1][0]),
        "spill_loads": int(spills[-1][1]),
        "shared": int(compiled.metadata.shared),
        "opcodes": sass_opcodes(cubin),
    }
    return row, cubin


def problems(row: dict) -> list[str]:
    """What is wrong with one row of the table: spills, registers at the cap (ptxas had to squeeze), a block whose
    registers do not fit the register file, shared memory beyond the device's limit."""
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"{row['spill_stores']}/{row['spill_loads']} bytes of spill stores/loads")
    if not 0 < row["registers"] < row["register_cap"]:
        found.append(f"{row['registers']} registers, not below the cap of {row['register_cap']}")
    threads = 32 * row["config"]["num_warps"]
    allocated = -(-row["registers"] // REGISTER_GRANULE) * REGISTER_GRANULE
    if allocated * threads > REGISTER_FILE:
        found.append(f"{allocated} registers x {threads} threads exceed the register file of {REGISTER_FILE}")
    if row["shared"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared']} bytes of {row['shared_limit']}")
    return found


_cubin_dir: Path | None = None


def _compile_job(job: tuple[str, int, str, str]) -> dict:
    """Worker: ``(module, index of the spec, target, variant)`` to a table row (specs hold functions, which do
    not pickle; each worker builds the same list)."""
    module, index, target, variant = job
    arch = TARGETS[target][0]
    spec = specs(module)[index]
    row, cubin = compile_spec(spec, arch, variant)
    shared_limit = TARGETS[target][1]
    row.update(module=module, target=target, shared_limit=shared_limit, spec=spec_id(spec))
    row["source"] = source_hash(module)
    if _cubin_dir is not None:
        (_cubin_dir / cubin_name(row["spec"], arch, variant)).write_bytes(cubin)
    return row


def _init_worker(cubin_dir: Path | None) -> None:
    global _cubin_dir
    _cubin_dir = cubin_dir
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True


def all_jobs(modules: tuple[str, ...] = MODULES, select: set[str] | None = None) -> list[tuple[str, int, str, str]]:
    """``(module, index of the spec, target, variant)`` of every row of ``modules`` (or of the specs in
    ``select``), in spec order."""
    return [
        (module, index, target, variant)
        for module in modules
        for index, spec in enumerate(specs(module))
        if select is None or spec_id(spec) in select
        for variant in spec["variants"]
        for target in TARGETS
    ]


def _row_key(row: dict) -> tuple[str, str, str]:
    return row["spec"], row["variant"], row["target"]


def fresh_rows(table: dict, modules: tuple[str, ...] = MODULES) -> tuple[list[dict], list[tuple]]:
    """The rows of ``table`` that are fresh for ``modules`` (a spec the launchers make, compiled from today's
    sources by today's triton), in spec order, and the jobs of the rows it lacks or holds stale."""
    rows = {_row_key(row): row for row in table.get("kernels", [])}
    hashes = {module: source_hash(module) for module in modules}
    fresh, stale = [], []
    for job in all_jobs(modules):
        module, index, target, variant = job
        row = rows.get((spec_id(specs(module)[index]), variant, target))
        if row is not None and row.get("source") == hashes[module]:
            fresh.append(row)
        else:
            stale.append(job)
    return fresh, stale


def load_table(path: Path = TABLE) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"kernels": []}


def resource_table(
    modules: tuple[str, ...] = MODULES,
    jobs: int = 2,
    select: set[str] | None = None,
    cubins: Path | None = None,
    work: list[tuple[str, int, str, str]] | None = None,
) -> list[dict]:
    """Every spec of every kernel module (or those named in ``select``, or the jobs in ``work``), compiled for
    every target, in ``jobs`` processes; rows in job order."""
    if work is None:
        work = all_jobs(modules, select)
    if not work:
        return []
    if jobs <= 1:
        _init_worker(cubins)
        return [_compile_job(job) for job in work]
    with multiprocessing.get_context("fork").Pool(jobs, _init_worker, (cubins,)) as pool:
        return pool.map(_compile_job, work, chunksize=1)


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the resource table")
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES, help="kernel modules")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--select", nargs="+", help="compile only these spec ids")
    parser.add_argument("--update", action="store_true", help="compile only the missing or stale rows of --out")
    parser.add_argument("--cubins", type=Path, help="directory to keep the cubins in")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    if args.cubins is not None:
        args.cubins.mkdir(parents=True, exist_ok=True)
    modules, select = tuple(args.modules), None if args.select is None else set(args.select)
    merge = args.update or set(modules) != set(MODULES) or select is not None
    kept, stale = fresh_rows(load_table(args.out)) if merge else ([], [])  # fresh rows of every module
    work = [job for job in stale if job[0] in modules] if args.update else all_jobs(modules, select)
    started = time.perf_counter()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default today, stated so that it does not warn
    with tempfile.TemporaryDirectory(prefix="fastbert-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = resource_table(jobs=args.jobs, cubins=args.cubins, work=work)
    seconds = time.perf_counter() - started
    print(f"aot: {len(rows)} compiles in {seconds:.0f} s ({args.jobs} processes)", file=sys.stderr)
    compiled = {_row_key(row) for row in rows}
    rows += [row for row in kept if _row_key(row) not in compiled]
    order = {(spec_id(specs(m)[i]), v, t): n for n, (m, i, t, v) in enumerate(all_jobs())}
    rows.sort(key=lambda row: order[_row_key(row)])
    bad = [f"{row['kernel']} {row['config']} on {row['arch']}: {'; '.join(problems(row))}" for row in rows]
    bad = [line for line, row in zip(bad, rows, strict=True) if problems(row)]
    table = {"triton": triton_version(), "compiles": len(rows), "seconds": round(seconds), "problems": bad}
    table["kernels"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".tmp")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    partial.replace(args.out)
    for line in bad:
        print(f"aot: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
