"""benchmarks/gpu_acceptance.py cannot rot: its dry run (the CPU, the Triton interpreter, tiny shapes, ``--model
tiny``) runs every section and passes, writing every section's figures to the JSON; a kernel that disagrees with
its reference fails the run; and the peaks it divides by are the data sheets'."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastbert.train import flops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k not in ("TRITON_INTERPRET", "FASTBERT_KERNEL_DEVICE")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_dry_run_runs_every_section_and_passes(tmp_path):
    acceptance = _script()
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert report["dry_run"] and report["passed"]
    assert list(report["sections"]) == list(acceptance.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "passed", (name, section.get("error"))
        assert f"  {name} " in proc.stdout  # the table
        assert (tmp_path / "gpu_acceptance_logs" / f"{name}.log").exists()
    sections = {name: section["result"] for name, section in report["sections"].items()}

    assert sum(acceptance.BUDGETS["gpu"].values()) <= 7 * 60 - 5  # the GPU run's promise, the build included
    tests = sections["kernel_tests"]
    assert tests["tests"] == tests["passed"] == len(acceptance.DRY_KERNEL_TESTS)
    assert tests["where"].startswith("cpu")

    rows = sections["kernel_bench"]["results"]
    timed = {(r["kernel"], r["provider"]) for r in rows if r.get("ms", 0) > 0}
    for kernel in ("attention", "residual_layer_norm", "bias_gelu", "mlm_loss", "lamb"):
        assert (kernel, "fastbert") in timed, kernel
    assert {("attention", "sdpa_flash_padded"), ("attention", "sdpa_flash_packed")} <= timed
    assert {("mlm_loss", "torch_full_logits"), ("lamb", "torch_foreach_lamb")} <= timed
    assert len([r for r in rows if r["kernel"] == "attention" and r["provider"] == "fastbert"]) == 2  # seq 128, 512
    assert {("disentangled_attn", "fastbert"), ("disentangled_attn", "torch_eager")} <= timed
    assert {r["provider"]: r["skipped"] for r in rows if "skipped" in r} == {
        "deepspeed_fused_lamb": "skipped: no CUDA",
        "apex_fused_lamb": "skipped: no CUDA",
    }

    pretrain = sections["pretrain"]
    assert acceptance.PROFILES["gpu"]["zero_stages"] == (0, 2)  # the dry run launches ZeRO-2 only
    for run in ("fastbert_zero2", "transformers"):
        assert pretrain[run]["tokens_per_s"] > 0 and pretrain[run]["timed_steps"] >= 2, run
    assert "fastbert_zero0" not in pretrain and pretrain["speedup_zero2_vs_transformers"] > 0
    assert sections["finetune"]["steps"] == acceptance.PROFILES["dry"]["finetune_steps"]
    assert sections["tokenizer"]["cuda"].startswith("skipped: no CUDA")
    assert sections["tokenizer"]["ids"] > 10_000

    deberta = sections["deberta"]
    by_provider = {r["provider"]: r for r in deberta["results"]}
    ours = by_provider["fastbert"]  # the kernel under the interpreter against transformers' module, fp32
    assert ours["output_error"] < 1e-4 and ours["input_grad_error"] < 1e-4, ours
    assert ours["speedup_vs_transformers"] > 0 and by_provider["transformers_eager"]["output_error"] == 0
    assert {"flashdeberta", "disentangled_flash"} <= set(deberta["not_run"]) | set(by_provider)


PERTURBED_REFERENCE = """
import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    import kernel_checks

    real = kernel_checks.assert_within

    def against_a_perturbed_reference(name, fused, ref, allowed):
        real(name, fused, ref.double() * 1.05, allowed)

    kernel_checks.assert_within = against_a_perturbed_reference
"""


def test_a_kernel_off_its_reference_fails_the_run(tmp_path):
    """The dry run's kernel tests compared against references scaled by 1.05 (a pytest plugin reaching the run's
    pytest through PYTEST_ADDOPTS): the section fails, naming the tests, the next section still runs, and the run
    exits 1."""
    (tmp_path / "perturbed_reference.py").write_text(PERTURBED_REFERENCE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTEST_ADDOPTS": "-p perturbed_reference"}
    proc = _run(tmp_path / "out", "--only", "kernel_tests", "--only", "tokenizer", env=env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads((tmp_path / "out" / "gpu_acceptance.json").read_text())["sections"]
    assert sections["tokenizer"]["status"] == "passed"  # a failed section is recorded and the run goes on
    section = sections["kernel_tests"]
    assert section["status"] == "failed" and "FAILED: kernel_tests" in proc.stdout
    # every comparison against a reference fails; the dispatch and skipped-step checks compare nothing
    assert section["result"]["failures"] == len(_script().DRY_KERNEL_TESTS) - 2 == 12
    assert any("test_varlen_attention_matches_reference" in name for name in section["result"]["not_passed"])
    assert section["error"].startswith("SectionFailed: 12 failed")


def test_kernel_device_cuda_means_cuda_or_a_loud_failure():
    """FASTBERT_KERNEL_DEVICE=cuda never falls back to the interpreter: without a GPU the kernel tests do not run
    (and do not skip) but stop with an error naming the setting."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/kernels/test_bias_gelu.py",
            "-k",
            "dispatch",
        ],
        cwd=ROOT,
        env={**env, "FASTBERT_KERNEL_DEVICE": "cuda"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stdout[-3000:]
    else:
        assert proc.returncode not in (0, 5), proc.stdout[-3000:]  # 5: nothing collected
        assert "FASTBERT_KERNEL_DEVICE=cuda but torch sees no CUDA device" in proc.stdout + proc.stderr


@pytest.mark.gpu
def test_kernel_tests_pass_natively_on_cuda():
    """Where there is a GPU, tests/kernels again in a process of its own on CUDA tensors, without the interpreter."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the kernel tests run under the Triton interpreter only")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ignored = [f"--ignore={path}" for path in _script().COMPILE_ONLY_TESTS]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", *ignored],
        cwd=ROOT,
        env={**env, "FASTBERT_KERNEL_DEVICE": "cuda"},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name,bf16,tf32,fp32,bandwidth",
    [
        ("NVIDIA H200", 989, 494.5, 67, 4.8e12),
        ("NVIDIA H100 80GB HBM3", 989, 494.5, 67, 3.35e12),
        ("NVIDIA H100 PCIe", 756, 378, 51, 2.0e12),
        ("NVIDIA A100-SXM4-80GB", 312, 156, 19.5, 2.039e12),
        ("NVIDIA A100-SXM4-40GB", 312, 156, 19.5, 1.555e12),
        ("NVIDIA A10", 125, 62.5, 31.2, 6.0e11),
        ("NVIDIA L4", 121, 60, 30.3, 3.0e11),
        ("NVIDIA L40S", 362, 183, 91.6, 8.64e11),
        ("Tesla V100-SXM2-16GB", None, 15.7, 15.7, 9.0e11),  # no TF32 tensor cores: fp32 is fp32 either way
    ],
)
def test_peaks_the_acceptance_divides_by(monkeypatch, name, bf16, tf32, fp32, bandwidth):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert flops.peak_flops(cuda, "bf16") == (None if bf16 is None else bf16 * 1e12)
    assert flops.peak_flops(cuda, "fp32") == tf32 * 1e12  # TF32 allowed: the default
    assert flops.peak_flops(cuda, "fp32", tf32=False) == fp32 * 1e12
    assert flops.peak_bandwidth(cuda) == bandwidth
    assert flops.gpu_peak(cuda).bandwidth == bandwidth
