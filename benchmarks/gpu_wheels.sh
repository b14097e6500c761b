#!/usr/bin/env bash
# The wheels the GPU machine lacks, fetched here because it has no network: fastbert's runtime dependencies that
# its image (Python 3.12, torch, triton, transformers, tokenizers, safetensors, pybind11, ninja, pytest) does not
# ship, for CPython 3.12 on manylinux x86_64, into .whl/ (ignored by git; carried with the device call, 64 MiB at
# most). benchmarks/gpu_acceptance.py --setup installs them there with
#     pip install --no-index --find-links .whl "setuptools>=77" wheel deepspeed blingfire   (and pytest-xdist)
# so pip takes from .whl/ only what the image does not already satisfy.
#
#     bash benchmarks/gpu_wheels.sh        # then: du -sh .whl
#
# Not carried: torch, triton, numpy (the image's), and what the acceptance run does not import: scikit-learn, SciPy
# and seqeval (fine-tuning metrics; the run fine-tunes without --eval), matplotlib (plots), tensorboard (pretrain
# writes metrics.jsonl without it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl
mkdir -p "$OUT"

TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform any --only-binary=:all:)

# Binary and pure-Python wheels with their own small dependencies (none of them pulls torch or numpy).
# DeepSpeed's requirements minus torch, numpy, ninja, packaging, tqdm (the image has them); blingfire splits
# sentences in prepare-data; pytest-xdist runs the kernel tests in parallel.
pip download "${TARGET[@]}" -d "$OUT" \
    "pydantic>=2" msgpack psutil hjson py-cpuinfo nvidia-ml-py einops blingfire pytest-xdist
# The deberta section's comparisons: FlashDeBERTa and DisentangledFlash, pure-Python Triton packages whose other
# requirements (torch, triton, transformers, einops) are the image's or above.
pip download "${TARGET[@]}" --no-deps -d "$OUT" flashdeberta disentangled-flash
# The build backend pyproject.toml asks for (pip install -e . --no-build-isolation uses the installed one).
pip download "${TARGET[@]}" -d "$OUT" "setuptools>=77" wheel

# blingfire's wheel (42 MB) is mostly tokenizer models prepare-data never loads (it calls text_to_sentences, whose
# model is built into the library): leave out its .bin and .i2w files, so the carry stays small.
python - <<'PY'
import base64, hashlib, pathlib, zipfile

src = next(pathlib.Path(".whl").glob("blingfire-*.whl"))
trimmed, rows = src.with_suffix(".trimmed"), []
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    for info in zin.infolist():
        if info.filename == record or info.filename.endswith((".bin", ".i2w")):
            continue
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
trimmed.replace(src)
PY

# DeepSpeed is an sdist only: build its (pure-Python) wheel here, without compiling any op.
DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w "$OUT" "deepspeed==0.19.8"
ls -la "$OUT"
du -sh "$OUT"
