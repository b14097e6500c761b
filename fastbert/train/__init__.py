"""Training drivers over DeepSpeed: pretraining, checkpoints, export to HF format."""
