"""Ahead-of-time compile of every kernel configuration the launchers can pick, for GPUs this machine may lack.

Owns the list of targets and the resource table: for each kernel module's ``aot_specs()`` and each target it runs
``triton.compile`` down to a cubin with the ptxas bundled in the triton wheel, and reads registers and spilled
bytes from the ptxas log and shared memory from the compiled metadata. It catches what the interpreter accepts
and a GPU would reject (dots below 16 wide, loop-carried type changes, register spills, shared memory beyond the
device's limit, which is otherwise only checked at launch). It does not launch anything.

Run ``python -m fastbert.kernels.aot --out FILE`` with ``TRITON_INTERPRET`` unset (under the interpreter
``triton.jit`` gives functions that cannot be compiled). Triton's cache is pointed at a fresh directory so that
ptxas really runs and its log is there to read. With ``--modules`` naming some modules, their rows replace those
of the same modules in an existing ``FILE`` built by the same triton version, and the other rows stay.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("bias_gelu", "residual_layer_norm", "mlm_loss", "attention", "lamb")
# name -> (arch, shared memory per block the kernel may use at most, in bytes)
TARGETS = {"H100 (sm_90)": (90, 227 * 1024), "A100 (sm_80)": (80, 163 * 1024)}

_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_spec(spec: dict, arch: int) -> dict:
    """Compile one spec (from a module's ``aot_specs()``) for ``arch``; returns its row of the resource table."""
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
    # Pointers as the launcher usually sees them: 16-byte aligned, which triton's JIT specializes on (it does the
    # same for integers divisible by 16; those variants depend on the shapes and are not enumerated here).
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")
    }
    source = ASTSource(fn, signature, spec["constexprs"], aligned)
    options = {"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 3)}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    text = log.getvalue()
    used, spills = _USED.findall(text), _SPILLS.findall(text)
    if not used or not spills:
        raise RuntimeError(f"aot: no ptxas resource line for {fn.__name__} (is the triton cache warm?):\n{text}")
    return {
        "kernel": fn.__name__,
        "config": spec["config"],
        "arch": f"sm_{arch}",
        "registers": int(used[-1]),
        "spill_stores": int(spills[-1][0]),
        "spill_loads": int(spills[-1][1]),
        "shared": int(compiled.metadata.shared),
    }


def resource_table(modules: tuple[str, ...] = MODULES) -> list[dict]:
    """Every spec of every kernel module, compiled for every target."""
    import importlib

    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    rows = []
    for module in modules:
        specs = importlib.import_module(f"fastbert.kernels.{module}").aot_specs()
        for spec in specs:
            for target, (arch, shared_limit) in TARGETS.items():
                row = compile_spec(spec, arch)
                row.update(module=module, target=target, shared_limit=shared_limit)
                rows.append(row)
    return rows


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the resource table")
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES, help="kernel modules")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastbert-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = resource_table(tuple(args.modules))
    print(f"aot: {len(rows)} compiles in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if set(args.modules) != set(MODULES) and args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("triton") == triton_version():
            rows += [row for row in previous["kernels"] if row["module"] not in args.modules]
    rows.sort(key=lambda row: MODULES.index(row["module"]))  # stable: each module's rows keep their order
    table = {"triton": triton_version(), "kernels": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".tmp")
    partial.write_text(json.dumps(table, indent=1) + "\n")
    partial.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
