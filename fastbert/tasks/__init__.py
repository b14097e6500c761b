"""Fine-tuning tasks: file formats, features (tokenization and answer decoding) and metrics."""
