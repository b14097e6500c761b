"""``fastbert distill``: a DistilBERT-style student from a teacher, on prepared pretraining shards.

The student is the teacher with fewer layers, initialised from every other teacher layer (0, 2, 4, ...) plus the
teacher's embeddings and heads. Its loss is DistilBERT's triple loss: the temperature-scaled KL divergence to the
teacher's MLM distribution at the masked positions (times T^2), the student's own MLM loss, and a cosine loss
pulling its last hidden states toward the teacher's. The student is saved in HF format like any model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastbert.atomic import write_atomic
from fastbert.data.masking import MaskingCollator
from fastbert.data.sampler import MicroBatchPlan
from fastbert.data.shards import ShardDataset
from fastbert.model import BertForPreTraining
from fastbert.optim import warmup_poly_lr
from fastbert.options import option
from fastbert.train.distributed import default_device, pin, set_tf32, to_device

log = logging.getLogger("fastbert.distill")


@dataclass
class DistillArgs:
    teacher: str = option(help="HF-format teacher directory (with vocab.txt)")
    data: str = option(help="directory written by prepare-data with the teacher's vocab")
    out: str = option(help="directory for the student (HF format)")
    student_layers: int = option(6, help="student layers: layer i starts as a copy of teacher layer 2i")
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(32, help="sequences per step")
    lr: float = option(5e-4, help="peak learning rate (AdamW)")
    warmup: int = option(100, help="warmup steps")
    temperature: float = option(2.0, help="softmax temperature of the distillation loss")
    alpha_ce: float = option(5.0, help="weight of the KL divergence to the teacher's masked-token distribution")
    alpha_mlm: float = option(2.0, help="weight of the student's own masked-LM loss")
    alpha_cos: float = option(1.0, help="weight of the cosine loss between student and teacher hidden states")
    seed: int = option(0, help="seed of data order and masking")
    tf32: bool = option(True, help="on GPUs: fp32 matmuls and attention on TF32 tensor cores (Ampere and newer)")
    progress: bool = option(True, help="show a progress bar")


def student_from_teacher(teacher: BertForPreTraining, layers: int) -> BertForPreTraining:
    """A student with ``layers`` layers: layer i is a copy of teacher layer 2i; everything else is copied."""
    t_config = teacher.config
    if t_config.share_layers:
        raise ValueError("the teacher shares its layers (ALBERT); there is no every-other layer to take")
    if not 1 <= layers <= (t_config.num_hidden_layers + 1) // 2:
        raise ValueError(
            f"--student-layers {layers}: taking every other layer of a {t_config.num_hidden_layers}-layer "
            f"teacher allows 1..{(t_config.num_hidden_layers + 1) // 2}"
        )
    student = BertForPreTraining(t_config.replace(num_hidden_layers=layers))
    state = teacher.state_dict()
    mapped = {}
    for key in student.state_dict():
        if key.startswith("bert.encoder.layers."):
            _, _, _, index, rest = key.split(".", 4)
            mapped[key] = state[f"bert.encoder.layers.{2 * int(index)}.{rest}"]
        else:
            mapped[key] = state[key]
    student.load_state_dict(mapped)
    return student


# What the loss reads from a collated batch.
BATCH_INPUTS = (
    "input_ids",
    "token_type_ids",
    "position_ids",
    "cu_seqlens",
    "max_seqlen",
    "masked_positions",
    "masked_labels",
)


def masked_logits(model: BertForPreTraining, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return F.linear(model.cls.transform_hidden(hidden.index_select(0, rows)), model.decoder_weight, model.cls.bias)


def distill_loss(
    student: BertForPreTraining, teacher: BertForPreTraining, batch: dict, args: DistillArgs
) -> dict[str, torch.Tensor]:
    inputs = dict(
        input_ids=batch["input_ids"],
        token_type_ids=batch["token_type_ids"],
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        max_seqlen=batch["max_seqlen"],
    )
    rows = batch["masked_positions"]
    with torch.no_grad():
        t_hidden, _ = teacher.bert.encode(**inputs)
        t_logits = masked_logits(teacher, t_hidden, rows)
    s_hidden, _ = student.bert.encode(**inputs)
    s_logits = masked_logits(student, s_hidden, rows)
    temperature = args.temperature
    ce = (
        F.kl_div(
            F.log_softmax(s_logits / temperature, dim=-1),
            F.softmax(t_logits / temperature, dim=-1),
            reduction="batchmean",
        )
        * temperature**2
    )
    mlm = F.cross_entropy(s_logits, batch["masked_labels"]) if rows.numel() else s_logits.sum() * 0
    cos = (1 - F.cosine_similarity(s_hidden, t_hidden, dim=-1)).mean()
    total = args.alpha_ce * ce + args.alpha_mlm * mlm + args.alpha_cos * cos
    return {"loss": total, "kl": ce, "mlm": mlm, "cosine": cos}


def distill(args: DistillArgs) -> dict:
    from tqdm import tqdm

    from fastbert.tokenizer import WordPieceTokenizer

    torch.manual_seed(args.seed)
    device = default_device()
    set_tf32(args.tf32)
    out = Path(args.out)
    teacher = BertForPreTraining.from_pretrained(args.teacher).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tokenizer = WordPieceTokenizer.from_pretrained(args.teacher)
    data = ShardDataset(args.data, vocab_tokens=tokenizer.vocab.tokens)
    student = student_from_teacher(teacher, args.student_layers).to(device).train()
    ids = data.special_ids
    collate = MaskingCollator(
        teacher.config.vocab_size, list(ids.values()), ids["mask"], seed=args.seed, pad_id=ids["pad"]
    )
    plan = MicroBatchPlan(len(data), args.batch_size, args.batch_size, seed=args.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    write_atomic(metrics_path, b"")
    record: dict = {}
    for step in tqdm(range(args.steps), desc="distill", unit="step", disable=not args.progress):
        for group in optimizer.param_groups:
            group["lr"] = warmup_poly_lr(step, args.lr, args.warmup, args.steps)
        indices, epochs = plan.indices(step)
        batch = collate([data[int(i)] for i in indices], indices, epochs)
        if device.type == "cuda":
            batch = pin(batch)
        losses = distill_loss(student, teacher, to_device(batch, device, BATCH_INPUTS), args)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()  # the step's one read back
        record = {"step": step + 1, **dict(zip(losses, values, strict=True))}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_atomic(out / "distill_args.json", (json.dumps(asdict(args), indent=2) + "\n").encode())
    log.info("student with %d layers saved to %s", args.student_layers, out)
    return record
