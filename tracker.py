"""
An experiment tracker for long runs, as nanoGPT offers: `--wandb_project=NAME` logs to Weights &
Biases what log.jsonl holds (both validation losses, the loss, learning rate, gradient norm,
tokens/s, MFU, the objective of each step and the switch). Off by default; the `wandb` package is
imported only when asked for. For no network at all: WANDB_MODE=offline (then `wandb sync` later).
"""

import math


class Tracker:
    """One W&B run. Its files go under out_dir/wandb, beside the run's own."""

    def __init__(self, project: str, name: str, config: dict, out_dir: str):
        try:
            import wandb
        except ImportError:
            raise ImportError("--wandb_project needs the optional wandb package: "
                              "pip install wandb") from None
        self.run = wandb.init(project=project, name=name, config=config, dir=out_dir)

    def log(self, record: dict):
        """A log.jsonl record at its step. A NaN or an infinity (the MFU of a GPU whose peak is not
        known) is left out, as log.jsonl writes null."""
        values = {k: v for k, v in record.items() if k != "step"
                  and not (isinstance(v, float) and not math.isfinite(v))}
        self.run.log(values, step=record["step"])

    def finish(self):
        self.run.finish()
