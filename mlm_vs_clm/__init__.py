"""The plumbing beside the paper's files: settings, files, checkpoints, devices, tokenizers,
Hugging Face I/O, fine-tuning tasks and metrics. README.md maps the tree."""

