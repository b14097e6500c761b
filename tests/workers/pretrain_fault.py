"""``fastbert pretrain`` with a fault injected on one rank at one optimizer step; production code has no test hooks.

    torchrun --nproc_per_node 2 tests/workers/pretrain_fault.py nan|nan-on|stop RANK STEP pretrain ARGS...
    deepspeed ... tests/workers/pretrain_fault.py nan|nan-on|stop RANK STEP pretrain ARGS...

``nan``: on rank RANK, every micro-batch of optimizer step STEP (1-based, as in metrics.jsonl) has its MLM and
sentence losses multiplied by NaN, so that rank's gradients (and after the all-reduce every rank's) are NaN;
``nan-on``: the same at step STEP and every step after it.
``stop``: rank RANK stops itself with SIGSTOP in the forward pass of the last micro-batch of step STEP (it keeps its
sockets open, so the other ranks wait inside one of DeepSpeed's collectives until the distributed timeout).
"""

import os
import signal
import sys

import fastbert.train.pretrain as pretrain
from fastbert.cli import main
from fastbert.model import BertForPreTraining

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher puts it first
kind, fault_rank, fault_step = argv[0], int(argv[1]), int(argv[2])
here = int(os.environ.get("RANK", "0")) == fault_rank
current = {"step": 0, "micro": 0, "accumulation": 0}

real_optimizer_step = pretrain.optimizer_step


def optimizer_step(engine, micro_batches, *args, **kwargs):
    current["step"] += 1  # the step being run, 1-based
    current["micro"], current["accumulation"] = 0, len(micro_batches)
    return real_optimizer_step(engine, micro_batches, *args, **kwargs)


real_forward = BertForPreTraining.forward


def forward(self, *args, **kwargs):
    out = real_forward(self, *args, **kwargs)
    at_fault = current["step"] >= fault_step if kind == "nan-on" else current["step"] == fault_step
    if self.training and here and at_fault:
        current["micro"] += 1
        if kind in ("nan", "nan-on"):
            out.mlm_loss = out.mlm_loss * float("nan")
            if out.sentence_loss is not None:
                out.sentence_loss = out.sentence_loss * float("nan")
        elif kind == "stop" and current["micro"] == current["accumulation"]:
            print(f"rank {fault_rank} stopping itself in step {fault_step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    return out


pretrain.optimizer_step = optimizer_step
BertForPreTraining.forward = forward
sys.exit(main(argv[3:]))
