"""How many tokens self-speculative decoding drafts per forward (stages/inference/speculative.py): fixed, or
adapted to the acceptance and the wall-clock seen so far (DraftPolicy). The decoder's output never depends on
it; only its speed does.
"""

import copy

INITIAL_BACKOFF = 4
"""Greedy steps before the first probe after drafting stopped paying (doubles after each failed probe)."""
MAX_BACKOFF = 64
CALIBRATION_STEPS = 2
"""Greedy steps an adaptive generation starts with: the wall-clock drafting has to beat."""
JUDGE_AFTER = 6
"""Steady drafting forwards at one cap before the clock judges it against greedy steps..."""
JUDGE_EARLY, CLEARLY_SLOWER = 2, 0.75
"""...or after JUDGE_EARLY of them when drafting runs at under CLEARLY_SLOWER of greedy's tokens/s."""
RETRY_AFTER = 128
"""Forwards after the clock lowered the cap before the cap one higher is tried again (doubling after each
failed retry, to MAX_RETRY): text and load change, so a cap the clock refused once is not refused for good."""
MAX_RETRY = 1024
DECAY = 0.9
"""Weight kept by the older forwards in each kind's (tokens, seconds) sums."""
_LEARNT_FIELDS = ("cap", "clock", "judged", "trial", "climbing", "retry_in", "retry_every")


class DraftPolicy:
    """How many tokens to draft in the next forward: `max_draft` always when fixed; when adaptive, from the
    acceptance and the wall-clock seen so far.

    Acceptance: CALIBRATION_STEPS greedy steps (which time greedy decoding), then up to `cap` drafts; a forward
    whose drafts were all accepted drafts one more next time (up to `cap`), a rejection drafts as many as were
    accepted. At 0 drafts the decoder steps greedily and, after `backoff` steps, probes with one draft (the
    backoff doubling after each failure, to MAX_BACKOFF).
    Clock: each kind of forward keeps decayed sums of the tokens it produced and the seconds it took; a cap is
    judged after JUDGE_AFTER drafting forwards at it (JUDGE_EARLY when drafting is clearly slower), drafting's
    tokens/s against greedy's. The cap starts at 1 and climbs by one while drafting is faster; slower lowers it by
    one (at 0 the decoder steps greedily, no probes) and stops the climb; RETRY_AFTER forwards later the cap one
    higher is tried again (the wait doubling after each failed retry). Starting low bounds what a model whose
    drafting does not pay loses before the clock says so (one cheap cap, not every cap from the top). A forward
    that switches from greedy to drafting is not timed: its heads catch up on the tokens they sat out, a cost the
    backoff bounds. The next generation on the same model resumes the cap and the clock (no calibration). The
    output never depends on any of it.
    """

    def __init__(self, max_draft: int, adaptive: bool):
        self.max_draft, self.adaptive = max_draft, adaptive and max_draft > 0
        self.cap = min(1, max_draft) if self.adaptive else max_draft
        self.backoff, self.wait = INITIAL_BACKOFF, CALIBRATION_STEPS
        self.clock = {"greedy": [0.0, 0.0], "draft": [0.0, 0.0]}
        """kind -> decayed sums of [tokens, seconds]."""
        self.judged, self.trial, self.climbing = 0, False, True
        """Drafting forwards timed at this cap; whether this cap is a retry; whether a faster cap climbs."""
        self.retry_in, self.retry_every = None, RETRY_AFTER
        """Forwards until the cap one higher is tried (None: no retry pending); the wait after the next drop."""

    def first(self) -> int:
        """Drafts to propose after the prompt."""
        return 0 if self.adaptive else self.max_draft

    def next_draft(self, verified: int, accepted: int) -> int:
        """Drafts to propose after a forward that verified `verified` drafts and accepted `accepted`."""
        if not self.adaptive:
            return self.max_draft
        if verified == 0:  # a greedy step: wait, or probe with one draft
            if self.wait > 0 or self.cap == 0:  # cap 0: the clock said drafting is slower than greedy
                self.wait = max(0, self.wait - 1)
                return 0
            return 1
        if accepted == verified:
            self.backoff = INITIAL_BACKOFF
            draft = min(self.cap, verified + 1)
        else:
            draft = min(accepted, self.cap)
        if draft == 0:
            self.wait, self.backoff = self.backoff, min(2 * self.backoff, MAX_BACKOFF)
        return draft

    def learnt(self) -> dict:
        """What this generation measured, for the next one on the same model (resume)."""
        return copy.deepcopy({field: getattr(self, field) for field in _LEARNT_FIELDS})

    def resume(self, learnt: dict | None) -> None:
        """Start from an earlier generation's measurements: its cap, clock and retry, no calibration steps
        (a model whose drafting was slower than greedy then decodes greedily from the start)."""
        if self.adaptive and learnt is not None:
            for field, value in copy.deepcopy(learnt).items():
                setattr(self, field, value)
            self.wait = 0  # the first draft comes right after the prompt's greedy step

    def record(self, verified: int, proposed: int, tokens: int, seconds: float) -> None:
        """Time a forward; judge the cap once enough drafting forwards were timed at it; count down to a retry."""
        if not self.adaptive:
            return
        if self.retry_in is not None:
            self.retry_in -= 1
            if self.retry_in <= 0:
                self._set_cap(self.cap + 1, trial=True)
                self.retry_in, self.wait, self.climbing = None, 0, True
        if verified == 0 and proposed > 0:
            return  # a switch to drafting: the heads' catch-up, not steady drafting
        kind = "greedy" if verified == 0 else "draft"
        sums = self.clock[kind]
        sums[0], sums[1] = DECAY * sums[0] + tokens, DECAY * sums[1] + seconds
        self.judged += kind == "draft"
        greedy, drafting = self.clock["greedy"], self.clock["draft"]
        if self.judged < JUDGE_EARLY or self.cap == 0 or greedy[1] == 0 or drafting[1] == 0:
            return
        speed = (drafting[0] / drafting[1]) / (greedy[0] / greedy[1])  # drafting's tokens/s over greedy's
        if self.judged < JUDGE_AFTER and speed >= CLEARLY_SLOWER:
            return
        if speed < 1.0:
            if self.trial:  # a failed retry or climb: the next retry waits twice as long
                self.retry_every = min(2 * self.retry_every, MAX_RETRY)
            self._set_cap(self.cap - 1, trial=False)
            self.retry_in, self.climbing = self.retry_every, False
        else:
            if self.trial:
                self.retry_every = RETRY_AFTER
            climb = self.climbing and self.cap < self.max_draft
            self._set_cap(self.cap + climb, trial=climb)
            if not self.climbing and self.cap < self.max_draft and self.retry_in is None:
                self.retry_in = self.retry_every

    def _set_cap(self, cap: int, trial: bool) -> None:
        """A new cap (or the same one, judged again), timed afresh."""
        self.cap, self.trial, self.judged = cap, trial, 0
        self.clock["draft"] = [0.0, 0.0]
