"""Fault injection for the fault-tolerance tests (tests/test_faults.py). Inert unless the environment
variable ``MINITRAIN_FAULTS`` is set; it is read once, when a run starts, never in the loop.

``MINITRAIN_FAULTS`` is a JSON object with any of:

- ``"halt": POINT`` — when the run reaches POINT it logs ``fault injection: halted at POINT`` and stops
  itself with SIGSTOP, frozen exactly there until the test kills it (SIGKILL): a kill -9 at a chosen
  moment, with no timing involved (the parent sees the stop with ``waitpid(WUNTRACED)``). POINTs:

  - ``step:N:backward`` (step N's gradients computed, no optimizer update yet), ``step:N:optimizer``
    (parameters updated, nothing logged), ``step:N:logged`` (step N's metrics record written);
  - ``save:N:PHASE``, inside the checkpoint write of step N (checkpoint.SAVE_PHASES, in order):
    ``tmpdir`` (empty step_N.tmp made), ``dcp`` (model/optimizer files written), ``rng``, ``trainer``
    (trainer.json written), ``checksums`` (checksums.json written, not yet renamed), ``renamed``
    (step_N complete, ``latest`` not yet updated), ``latest`` (``latest`` names step_N, old
    checkpoints not yet pruned). ``save:N:PHASE+torn`` first cuts the file written last to half its
    size (what a kill in the middle of writing it can leave behind), then halts.
- ``"poison": {"N": KIND, ...}`` — corrupt optimizer step N: ``nan`` (the loss × NaN: loss and
  gradients NaN), ``spike`` (the loss × 1000: a finite loss spike) or ``inf_grad`` (one gradient
  element set to +inf after backward; the loss stays finite).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

__all__ = ["Faults", "POISON_KINDS"]

ENV = "MINITRAIN_FAULTS"
POISON_KINDS = ("nan", "spike", "inf_grad")


@dataclass(frozen=True)
class Faults:
    halt: Optional[str] = None
    poison: dict = field(default_factory=dict)  # step (int) -> kind

    @classmethod
    def from_env(cls) -> "Faults":
        raw = os.environ.get(ENV)
        if not raw:
            return cls()
        try:
            spec = json.loads(raw)
            poison = {int(k): v for k, v in spec.get("poison", {}).items()}
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{ENV}={raw!r}: not a JSON object of halt/poison ({exc})") from None
        unknown = set(spec) - {"halt", "poison"} or {v for v in poison.values() if v not in POISON_KINDS}
        if unknown:
            raise ValueError(f"{ENV}: unknown keys or poison kinds {sorted(map(str, unknown))}")
        return cls(halt=spec.get("halt"), poison=poison)

    def point(self, name: str, directory: Optional[Path] = None) -> None:
        """Called by the trainer at each named point; halts the process there when asked to."""
        if self.halt is None or self.halt.split("+")[0] != name:
            return
        if self.halt.endswith("+torn") and directory is not None:
            files = sorted((p for p in Path(directory).iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
            if files:
                os.truncate(files[-1], files[-1].stat().st_size // 2)
        print(f"fault injection: halted at {self.halt}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)

    def poison_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``step`` is the 1-based number of the optimizer step being computed."""
        kind = self.poison.get(step)
        if kind == "nan":
            return loss * float("nan")
        if kind == "spike":
            return loss * 1000.0
        return loss

    def poison_grads(self, step: int, model: torch.nn.Module) -> None:
        if self.poison.get(step) == "inf_grad":
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP shard: this rank's part
            with torch.no_grad():
                grad.view(-1)[0] = float("inf")
