"""What a training run shows and leaves behind besides checkpoints: the progress bar, TensorBoard,
the loss-curve PNG and a sample generation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from .train_config import TrainConfig

__all__ = ["Progress", "plot_losses", "sample_text", "tensorboard_writer"]


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sample_text(model, tokenizer_path: Path, cfg: TrainConfig, path: Path) -> str:
    from .data import load_tokenizer
    from .generate import GenerationConfig, generate

    sp = load_tokenizer(tokenizer_path)
    gcfg = GenerationConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40, top_p=0.95,
                            repetition_penalty=1.0, eos_token_id=sp.eos_id())
    prompt = sp.encode(cfg.sample_prompt) or [sp.bos_id()]
    new = generate(model.eval(), [prompt], gcfg, generator=torch.Generator().manual_seed(cfg.seed))[0]
    text = sp.decode(prompt + new)
    path.write_text(text + "\n")
    log(f"--- sample ({path}) ---\n{text}\n---")
    return text


def plot_losses(metrics: Path, png: Path, ln_v: float) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in recs if r.get("loss_avg", r["loss"]) is not None]  # None: only skipped steps since the last
    ax.plot([r["step"] for r in train], [r.get("loss_avg", r["loss"]) for r in train], label="train loss (mean per record)")
    val = [r for r in recs if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o", label="validation CE")
    ax.axhline(ln_v, ls="--", c="gray", lw=0.8, label="ln V (uniform)")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="minitrain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return str(png)


def tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


class Progress:
    """tqdm when installed (loss, tokens/s, lr; tqdm shows the ETA), else a plain line every log_every."""

    def __init__(self, cfg: TrainConfig, start: int):
        self.cfg, self.t0, self.start = cfg, time.perf_counter(), start
        self.bar = None
        if cfg.progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=cfg.max_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}", refresh=False)
        elif self.cfg.progress and (step % self.cfg.log_every == 0 or step == self.cfg.max_steps):
            el = time.perf_counter() - self.t0
            eta = el / max(1, step - self.start) * (self.cfg.max_steps - step)
            print(f"step {step}/{self.cfg.max_steps}  loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s  "
                  f"ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
