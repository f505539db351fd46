"""A Hugging Face Trainer run that logs the gradient noise scale (tiny GPT-2 from a config, CPU, seconds).

Run: ``python examples/hf_trainer.py`` (needs ``pip install 'noisescale[hf]'``). No
download: the model is built from a ``GPT2Config`` and trained on random token
sequences with some label positions masked (-100). The Trainer normalises the loss by
the label tokens of each step, so B_simple comes out in tokens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from noisescale.integrations.huggingface import NoiseScaleCallback


class RandomTokens(torch.utils.data.Dataset):
    """``n`` sequences of ``length`` tokens from a 64-token vocabulary; a few labels masked."""

    def __init__(self, n: int = 256, length: int = 16, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, length), generator=gen)
        self.labels = self.ids.masked_fill(torch.rand(n, length, generator=gen) < 0.2, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(out_dir: str | Path, *, steps: int = 16) -> tuple[Trainer, NoiseScaleCallback]:
    """Train a 2-layer, 32-wide GPT-2 for ``steps`` optimizer steps with 2 accumulated micro-batches."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # 2 micro-batches per step: the microbatch method
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=RandomTokens())
    callback = NoiseScaleCallback(trainer, ema_decay=0.9)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


if __name__ == "__main__":
    trainer, callback = main(tempfile.mkdtemp())
    est = callback.meter.compute()
    b = "not resolved" if est.b_simple is None else f"{est.b_simple:.0f} {callback.unit}"
    print(f"B_simple = {b} after {est.steps} steps")
    print({k: v for k, v in trainer.state.log_history[-2].items() if not k.count("/") > 1})
