"""The pretraining step against a stand-in engine on the ``meta`` device, with a stand-in ``all_reduce`` that refuses
tensors anywhere else: catches the mixed-device bugs (a CPU batch handed to a GPU model, CPU tensors in an NCCL
collective) that a CPU-only run cannot show."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastbert.config import BertConfig
from fastbert.data.masking import MaskingCollator
from fastbert.data.shards import Sample
from fastbert.model import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    Layout,
    PreTrainingOutput,
)
from fastbert.optim import Lamb, parameter_groups
from fastbert.train.step import SUMS, optimizer_step

META = torch.device("meta")


class MetaEngine:
    """Checks that every tensor it is given lives on its device; returns meta outputs."""

    device = META

    def __init__(self):
        self.forwards = self.backwards = self.steps = 0

    def __call__(self, **inputs):
        for name, value in inputs.items():
            if torch.is_tensor(value):
                assert value.device == META, f"{name} reached the engine on {value.device}"
        self.forwards += 1
        scalar = torch.empty((), device=META)
        return PreTrainingOutput(
            loss=scalar, mlm_loss=scalar, sentence_loss=scalar, mlm_accuracy=scalar, sentence_accuracy=scalar
        )

    def backward(self, loss):
        assert loss.device == META
        self.backwards += 1

    def step(self):
        self.steps += 1


def refusing_all_reduce(tensor):
    if tensor.device != META:
        raise RuntimeError(f"all_reduce on a {tensor.device} tensor: NCCL refuses tensors off the GPU")


def _micro_batches(count: int) -> list[dict]:
    rng = np.random.default_rng(0)
    collate = MaskingCollator(500, [0, 1, 2, 3, 4], 4, seed=1)
    batches = []
    for m in range(count):
        samples = [
            Sample(
                np.concatenate([[2], rng.integers(5, 500, n), [3]]), np.zeros(n + 2, np.int64), int(rng.integers(0, 2))
            )
            for n in (7, 30, 12)
        ]
        indices = np.arange(3) + 3 * m
        batches.append(collate(samples, indices, np.zeros(3, np.int64)))
    return batches


def test_the_step_keeps_batches_and_collectives_on_the_engine_device():
    engine = MetaEngine()
    sums = optimizer_step(
        engine, _micro_batches(3), world_size=2, skipped=lambda: False, all_reduce=refusing_all_reduce
    )
    assert sums.device == META and sums.shape == (len(SUMS),)
    assert engine.forwards == engine.backwards == engine.steps == 3


def test_the_refusing_all_reduce_does_refuse():
    with pytest.raises(RuntimeError, match="NCCL refuses"):
        refusing_all_reduce(torch.zeros(2))


class ModelEngine(MetaEngine):
    """The real model on the ``meta`` device: any host sync in its forward or backward (``.item()``, ``int(t)``,
    ``nonzero``, a data-dependent size) raises, since meta tensors hold no values."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def __call__(self, **inputs):
        MetaEngine.__call__(self, **inputs)
        return self.module(**inputs)

    def backward(self, loss):
        super().backward(loss)
        loss.backward()


def _meta_model(cls, **overrides):
    config = BertConfig.preset("tiny", vocab_size=500, **overrides)
    with META:
        return cls(config).train()


@pytest.mark.parametrize("objective", ["nsp", "none"])
def test_the_model_steps_on_the_device_without_reading_it_back(objective):
    engine = ModelEngine(_meta_model(BertForPreTraining, sentence_objective=objective))
    batches = _micro_batches(2)
    if objective == "none":
        for b in batches:
            del b["next_sentence_label"]
    sums = optimizer_step(engine, batches, world_size=2, skipped=lambda: False, all_reduce=refusing_all_reduce)
    assert sums.device == META and engine.forwards == 2
    assert all(p.grad is not None and p.grad.device == META for p in engine.module.parameters() if p.requires_grad)


class LambEngine(ModelEngine):
    """``ModelEngine`` whose ``step`` is a real LAMB step on the meta parameters."""

    def __init__(self, model):
        super().__init__(model)
        self.optimizer = Lamb(parameter_groups(model, 0.01), lr=1e-3)

    def step(self):
        super().step()
        self.optimizer.step()
        self.optimizer.zero_grad()


def test_the_step_with_lamb_reads_nothing_back_and_reports_on_the_device():
    """Forward, backward, LAMB's step (norm, clip, skip decision, trust ratios) and the skip flag and gradient norm
    folded into the step's sums: all on the device, with no host read (meta tensors would raise)."""
    engine = LambEngine(_meta_model(BertForPreTraining, sentence_objective="none"))
    batches = _micro_batches(1)
    del batches[0]["next_sentence_label"]
    report = engine.optimizer.step_report
    sums = optimizer_step(
        engine,
        batches,
        world_size=2,
        skipped=lambda: report()[0],
        grad_norm=lambda: report()[1],
        all_reduce=refusing_all_reduce,
    )
    assert sums.device == META and sums.shape == (len(SUMS),) and engine.steps == 1
    assert all(s["step"].device == META for s in engine.optimizer.state.values())


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification, BertForQuestionAnswering])
def test_fine_tuning_heads_run_on_the_device_from_a_host_built_layout(cls):
    """A padded batch whose layout (the unpadding index) was built on the host runs without a host sync."""
    model = _meta_model(cls)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    layout = Layout.from_attention_mask(mask).to(META)
    ids = torch.randint(5, 500, (2, 4), device=META)
    out = model(input_ids=ids, attention_mask=layout, token_type_ids=torch.zeros_like(ids))
    logits = out.logits if hasattr(out, "logits") else out.start_logits
    assert logits.device == META and logits.shape[0] == 2


def test_a_host_built_layout_gives_the_same_outputs_as_the_mask():
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig.preset("tiny", vocab_size=500, num_labels=3)).eval()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    ids = torch.randint(5, 500, (3, 4))
    expected = model(input_ids=ids, attention_mask=mask).logits
    got = model(input_ids=ids, attention_mask=Layout.from_attention_mask(mask)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout is for a"):
        model(input_ids=ids[:2], attention_mask=Layout.from_attention_mask(mask))


def test_fine_tuning_inputs_cross_to_the_device_whole():
    from fastbert.train.finetune import model_inputs

    collated = {
        "input_ids": torch.tensor([[2, 7, 3, 0], [2, 3, 0, 0]]),
        "token_type_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "labels": torch.tensor([1, 0]),
    }
    inputs = model_inputs(collated, META)
    layout = inputs.pop("attention_mask")
    assert isinstance(layout, Layout) and layout.max_seqlen == 3 and layout.shape == (2, 4)
    assert layout.cu_seqlens.device == layout.index.device == META
    assert all(v.device == META for v in inputs.values())


def test_a_world_of_one_does_not_build_deepspeeds_shared_memory_op(monkeypatch):
    import importlib

    from fastbert.train import distributed

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(ds_torch, "build_shm_op", ds_torch.build_shm_op)  # restored after the test
    distributed._skip_shared_memory_op()
    assert ds_torch.build_shm_op() is None
