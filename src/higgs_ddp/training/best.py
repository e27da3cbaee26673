"""``eval.best_by`` and ``eval.early_stop_patience``: the best value of one metric so far, the step it came
from, and how many evaluations have passed without beating it.

The tracker is part of the run state: it is saved in every checkpoint (``state.json``, ``best``) and comes
back on resume, so a resumed run keeps the same ``best/`` and stops early at the same step as one that never
stopped. The metric is the same number on every rank (validation is all-reduced; the sample scores are
shared by rank 0), so every rank makes the same decision and joins the same collective save."""

from __future__ import annotations

import math
from typing import Optional

LOWER_IS_BETTER = {"val_loss": True, "wer": True, "speaker_sim": False}


class BestTracker:
    def __init__(self, metric: str, patience: int = 0):
        self.metric, self.patience = metric, patience
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.since_best = 0  # evaluations of the metric since the best one

    @property
    def enabled(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def update(self, step: int, value: Optional[float]) -> bool:
        """One evaluation of the metric; True when it is a new best. None is a value that could not be
        measured (no sample long enough for the speaker encoder, say): it is neither better nor worse, so it
        does not count towards the patience either (the caller says why it is missing). A non-finite value
        was measured (a loss that diverged): it never improves on anything and counts."""
        if value is None:
            return False
        better = math.isfinite(value) and (self.best is None or
                                           (value < self.best if LOWER_IS_BETTER[self.metric] else value > self.best))
        if better:
            self.best, self.best_step, self.since_best = float(value), step, 0
        else:
            self.since_best += 1
        return better

    @property
    def exhausted(self) -> bool:
        """eval.early_stop_patience evaluations in a row without a new best: time to stop."""
        return bool(self.patience) and self.since_best >= self.patience

    def describe(self) -> str:
        if self.best is None:
            return f"eval.best_by={self.metric}: no value yet"
        return f"best {self.metric} {self.best:.4f} at step {self.best_step}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load_state_dict(self, state: Optional[dict]) -> str:
        """Restore a checkpoint's tracker; a note when it cannot be (saved for another metric, or before
        trackers were saved): then the tracking starts afresh."""
        if not state:
            return "" if not self.enabled else f"eval.best_by={self.metric}: the checkpoint has no best so far; tracking starts now"
        if state.get("metric") != self.metric:
            return (f"eval.best_by={self.metric}: the checkpoint tracked {state.get('metric')}; tracking "
                    f"{self.metric} starts now" if self.enabled else "")
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]
        return ""
