"""Run state of the train loop: what a checkpoint must hold to continue exactly where a run stopped."""

from dataclasses import dataclass, field


@dataclass
class RunState:
    """Step counters, data-order position, recorded metric rows and probe losses, objective accumulators."""

    schedule: list[int]
    """[total_steps, accum_steps, step_tokens] the run was started with (a resume must match it)."""
    step: int = 0
    tokens_seen: int = 0
    order: dict = field(default_factory=lambda: {"epoch": 0, "position": 0})
    """WindowOrder.state(): epoch and position in its permutation."""
    metrics: list[tuple] = field(default_factory=list)
    """(step, tokens_seen, name, value) rows of metrics.parquet."""
    probe: list[dict] = field(default_factory=list)
    """Per evaluation: step, tokens_seen, split, token_index and loss tensors of the probe windows."""
    objective: dict = field(default_factory=dict)
    """The objective's own state_dict() (e.g. token-selection counters)."""
    train_seconds: float = 0.0

    def log(self, name: str, value: float) -> None:
        """Record one metric at the current step."""
        self.metrics.append((self.step, self.tokens_seen, name, float(value)))

    def state_dict(self) -> dict:
        """Plain types and tensors only (checkpoints load with weights_only=True)."""
        return {"schedule": list(self.schedule), "step": self.step, "tokens_seen": self.tokens_seen,
                "order": dict(self.order), "metrics": list(self.metrics), "probe": list(self.probe),
                "objective": self.objective, "train_seconds": self.train_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); ValueError when it was written for another schedule."""
        if list(state["schedule"]) != list(self.schedule):
            raise ValueError(f"checkpoint was written for schedule {state['schedule']} (steps, accumulation, "
                             f"batch tokens), not {self.schedule}")
        self.step, self.tokens_seen, self.order = state["step"], state["tokens_seen"], dict(state["order"])
        self.metrics, self.probe = list(state["metrics"]), list(state["probe"])
        self.objective, self.train_seconds = state["objective"], state["train_seconds"]
