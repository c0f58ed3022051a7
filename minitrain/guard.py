"""The bad-step policy of the training loop: what to do with a step whose loss or gradient norm is not
finite, or whose loss spikes (``--on-nonfinite``, ``--loss-spike-factor``, ``--loss-spike-window``).

The check runs after the backward passes and the gradient clipping, before ``optimizer.step()``, on
the loss summed over the micro-steps and ranks (every rank sees the same numbers and decides alike):

- bad: the loss or the global gradient norm is NaN/inf; or, with ``loss_spike_factor`` F > 0, the
  loss exceeds F × the mean loss of the last ``loss_spike_window`` accepted steps (checked once at
  least one step has been accepted).
- ``skip``: no optimizer step (parameters and optimizer state, Adam's step count included, stay
  as they were); the batch is consumed, the step number and the LR schedule advance; the step is
  logged in metrics.jsonl with ``"skipped": true`` and every record carries ``skipped_steps``.
- ``stop``: nothing is updated or saved; the run ends with :class:`BadStepError` (the CLI exits 3
  with its message); the last checkpoint is untouched.

The window of recent losses and the skip count are saved in every checkpoint (a resume decides alike).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["StepGuard", "BadStepError"]


class BadStepError(FloatingPointError):
    """A non-finite or spiking step under ``--on-nonfinite stop``."""


class StepGuard:
    def __init__(self, policy: str = "stop", spike_factor: float = 0.0, window: int = 50):
        self.policy, self.spike_factor, self.window = policy, spike_factor, window
        self.recent: list[float] = []  # losses of the last `window` accepted steps
        self.skipped = 0

    def check(self, loss: float, grad_norm: float) -> Optional[str]:
        """Why this step is bad, or None when it is fine."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        if self.spike_factor > 0 and self.recent:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return (f"the loss {loss:.6g} spikes above {self.spike_factor:g} × {mean:.6g} (the mean of the "
                        f"last {len(self.recent)} accepted steps)")
        return None

    def accept(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-self.window:]

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [float(x) for x in state["recent"]][-self.window:]
        self.skipped = int(state["skipped"])
