"""Data: tokenizers, the chat template, record schemas, readers, TFDS builders, grain pipelines."""
