"""The plumbing of the project, kept out of the paper's files: settings, files, checkpoints,
parallelism, tokenizers, Hugging Face I/O, the fine-tuning tasks and their metrics. The top-level
files (model.py, objectives.py, data.py, train.py, finetune.py) are the paper; README.md maps both.
"""
