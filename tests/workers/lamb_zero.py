"""Trains a small BERT for a few LAMB steps under DeepSpeed and saves the final parameters (rank 0), once per job.

    torchrun --nproc_per_node N tests/workers/lamb_zero.py OUT_DIR STAGE:aware|naive:VOCAB [...]

Each job starts from the same seed with a model and engine of its own and writes
``OUT_DIR/w{N}-z{STAGE}-{mode}-v{VOCAB}.pt``; one launch runs them all, so the process group and the imports are
paid once. Global batch 8 in micro-batches of 2 on every world size, so the optimizer steps see the same samples;
dropout 0, fp32. Used by tests/test_lamb.py to compare ZeRO-1/2 against no ZeRO.
"""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from fastbert import BertConfig, BertForPreTraining  # noqa: E402
from fastbert.data.masking import MaskingCollator  # noqa: E402
from fastbert.data.sampler import MicroBatchPlan  # noqa: E402
from fastbert.data.shards import Sample  # noqa: E402
from fastbert.optim import Lamb, parameter_groups, warmup_poly_lr  # noqa: E402

STEPS, GLOBAL, MICRO = 10, 8, 2


def main() -> None:
    out_dir, jobs = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo")
    for job in jobs:
        stage, mode, vocab = job.split(":")
        train(int(stage), mode, int(vocab), out_dir)


def train(stage: int, mode: str, vocab: int, out_dir: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    out = os.path.join(out_dir, f"w{world}-z{stage}-{mode}-v{vocab}.pt")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForPreTraining(config)
    optimizer = Lamb(parameter_groups(model, 0.01), lr=2e-2, max_grad_norm=None if stage > 0 else 1.0)
    # As the driver does: DeepSpeed clips under ZeRO (it alone sees every group's gradient), LAMB clips otherwise.
    ds_config = {
        "train_batch_size": GLOBAL,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_clipping": 1.0 if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if mode == "aware":
        optimizer.attach_to_engine(engine, list(model.parameters()))
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(64):
        n = int(rng.integers(5, 30))
        samples.append(
            Sample(
                np.concatenate([[2], rng.integers(5, vocab, n), [3]]),
                np.zeros(n + 2, np.int64),
                int(rng.integers(0, 2)),
            )
        )
    collate = MaskingCollator(vocab, [0, 1, 2, 3, 4], 4, seed=5)
    plan = MicroBatchPlan(len(samples), GLOBAL, MICRO, seed=2, rank=rank, world_size=world)
    for step in range(STEPS):
        for group in engine.optimizer.param_groups:
            group["lr"] = warmup_poly_lr(step, 2e-2, 3, STEPS)
        for micro in range(plan.accumulation):
            idx, epochs = plan.indices(step * plan.accumulation + micro)
            b = collate([samples[i] for i in idx], idx, epochs)
            loss = engine(
                b["input_ids"],
                token_type_ids=b["token_type_ids"],
                position_ids=b["position_ids"],
                labels=b["labels"],
                next_sentence_label=b["next_sentence_label"],
                cu_seqlens=b["cu_seqlens"],
                max_seqlen=b["max_seqlen"],
            ).loss
            engine.backward(loss)
            engine.step()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    dist.barrier()


if __name__ == "__main__":
    main()
