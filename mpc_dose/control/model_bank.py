"""Multiple-model estimation: which of a bank of candidate patients the readings follow.

The controller's model differs from the patient in more than one number (for the Cambridge
glucose model: the three insulin sensitivities, glucose production, volumes, insulin
absorption and action times), and a MAP fit of all of them every 5 minutes is far too slow
for a control cycle. A bank of candidate parameter vectors is cheap instead (multiple-model
adaptive estimation, Magill 1965; in dosing the multiple-model design of Jelliffe et al.
1993 and its sequential Bayesian use, ``../shared/reference``): each candidate's state
is propagated with what the patient got (the delivered rates and the boluses and announced
meals, through the caller's event list), corrected by the same output injection as the
controller's own state, and scored by how its **open-loop** prediction over the last
``lead_s`` met the readings (the 5-min innovation alone is mostly sensor noise; a wrong
insulin sensitivity shows over an hour). Scores forget with time constant ``forget_s``
(a day: meals and snacks nobody announced make single hours unreliable). After
``warmup_s`` the candidate with the least score is used, changing only when another's is
lower by ``switch_margin`` of it (no chattering between near-equal candidates).

The candidates share one RK4 step function mapped over the bank (one CasADi call moves
every candidate), the discretisation the NMPC's plans use.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.spec import Model

__all__ = ["BankConfig", "ModelBank"]


@dataclass(frozen=True)
class BankConfig:
    """How the bank is drawn, scores and chooses (times in s)."""

    #: candidates: the prior and this many minus one drawn from the population
    candidates: int = 16
    #: the draws' random seed (the same candidates for every patient of a trial)
    seed: int = 0
    #: open-loop predictions restart from the corrected states this often
    lead_s: float = 3600.0
    #: the scores' forgetting time constant
    forget_s: float = 86400.0
    #: the first candidate (the prior) is used until then
    warmup_s: float = 6 * 3600.0
    #: another candidate takes over when its score is below (1 - switch_margin) x the
    #: score of the one in use
    switch_margin: float = 0.2
    #: RK4 steps per period of propagation
    rk4_steps: int = 1
    #: caution: among the candidates scoring within this fraction of the best, the one
    #: whose output the probe moves most over lead_s (for insulin: the most sensitive,
    #: so the least insulin is planned) is chosen; 0: the best score alone
    cautious_within: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lead_s", "forget_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"bank.{name} must be > 0 [s], got {value!r}")
        if not (isinstance(self.warmup_s, (int, float)) and self.warmup_s >= 0):
            raise ConfigError(f"bank.warmup_s must be >= 0 [s], got {self.warmup_s!r}")
        if not (isinstance(self.switch_margin, (int, float)) and 0 <= self.switch_margin < 1):
            raise ConfigError(f"bank.switch_margin must be in [0, 1), got "
                              f"{self.switch_margin!r}")
        if not (isinstance(self.cautious_within, (int, float)) and self.cautious_within >= 0):
            raise ConfigError(f"bank.cautious_within must be >= 0, got "
                              f"{self.cautious_within!r}")
        if not (isinstance(self.candidates, int) and self.candidates >= 1):
            raise ConfigError(f"bank.candidates must be a whole number >= 1, got "
                              f"{self.candidates!r}")
        if not (isinstance(self.rk4_steps, int) and self.rk4_steps >= 1):
            raise ConfigError(f"bank.rk4_steps must be a whole number >= 1, got "
                              f"{self.rk4_steps!r}")


class ModelBank:
    """The bank for *model*: candidate parameter vectors *thetas* (one per row; the first
    is the prior, used until the warm-up ends), the tracked *output* and the output
    injection (*corrected_states*, *gain*) applied to every candidate's state as the
    controller applies it to its own; *period_s* is the control period (the RK4 step);
    *probe* (model input rates) the extra rates whose effect on the output over ``lead_s``
    ranks the candidates for caution (``cautious_within``).
    """

    def __init__(self, model: Model, thetas: np.ndarray, output: str, *, period_s: float,
                 corrected_states: Sequence[str] = (), gain: float = 0.5,
                 probe: np.ndarray | None = None,
                 config: BankConfig = BankConfig()) -> None:
        thetas = np.atleast_2d(np.asarray(thetas, dtype=float))
        if thetas.shape[1] != len(model.params) or thetas.shape[0] < 1:
            raise ConfigError(f"bank: expected candidate rows of {len(model.params)} "
                              f"parameter values, got shape {thetas.shape}")
        if not np.all(np.isfinite(thetas)):
            raise ConfigError("bank: a candidate has a non-finite parameter value")
        self.model, self.config = model, config
        self.thetas = thetas
        self.period_s = float(period_s)
        self._probe = None if probe is None else np.asarray(probe, dtype=float).ravel()
        if config.cautious_within > 0 and (self._probe is None or not self._probe.any()):
            raise ConfigError("bank.cautious_within needs a probe (extra input rates whose "
                              "effect ranks the candidates)")
        self._k = model.output_index(output)
        self._states = [model.state_index(name) for name in corrected_states]
        self._gain = float(gain)
        K = thetas.shape[0]
        self._step, self._step_both = self._build_step(K)
        x, th, t = (ca.SX.sym("x", model.n_states), ca.SX.sym("th", len(model.params)),
                    ca.SX.sym("t"))
        self._output = ca.Function("bank_output", [x, th, t], [
            model.h(t, x, ca.SX.zeros(model.n_inputs), th)[self._k]]).map(K)
        self.x = np.column_stack([model.initial_state(th) for th in thetas])  # n x K
        self._open = self.x.copy()
        self._open_from = 0.0
        self._t = 0.0
        #: forgetting-weighted sum of squared open-loop prediction errors per candidate
        self.scores = np.zeros(K)
        #: the candidate in use
        self.current = 0
        #: (time [s], from, to) of every change of candidate
        self.switches: list[tuple[float, int, int]] = []

    def _build_step(self, K: int) -> tuple[ca.Function, ca.Function]:
        """Every candidate's state after *h* seconds at rates *u* from time *t*: RK4, mapped
        over the K candidates and over 2K (the corrected states and the open-loop ones,
        moved in one call)."""
        m, steps = self.model, self.config.rk4_steps
        x, th = ca.SX.sym("x", m.n_states), ca.SX.sym("th", len(m.params))
        t, u, h = ca.SX.sym("t"), ca.SX.sym("u", m.n_inputs), ca.SX.sym("h")
        dt = h / steps
        z = x
        for i in range(steps):
            ts = t + i * dt
            k1 = m.f(ts, z, u, th)
            k2 = m.f(ts + dt / 2, z + dt / 2 * k1, u, th)
            k3 = m.f(ts + dt / 2, z + dt / 2 * k2, u, th)
            k4 = m.f(ts + dt, z + dt * k3, u, th)
            z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        one = ca.Function("bank_step", [x, th, t, u, h], [z])
        return one.map(K), one.map(2 * K)

    def _advance(self, states: np.ndarray, t0: float, t1: float, u: np.ndarray
                 ) -> np.ndarray:
        if t1 <= t0:
            return states
        K = states.shape[1]
        out = self._step(states, self.thetas.T, np.full((1, K), t0),
                         np.tile(np.asarray(u, float).reshape(-1, 1), (1, K)),
                         np.full((1, K), t1 - t0))
        return np.asarray(out, dtype=float)

    def _advance_both(self, t0: float, t1: float, u: np.ndarray) -> None:
        """The corrected and the open-loop states of every candidate moved to *t1*."""
        if t1 <= t0:
            return
        K = self.x.shape[1]
        both = np.asarray(self._step_both(
            np.hstack([self.x, self._open]), np.hstack([self.thetas.T, self.thetas.T]),
            np.full((1, 2 * K), t0), np.tile(np.asarray(u, float).reshape(-1, 1), (1, 2 * K)),
            np.full((1, 2 * K), t1 - t0)), dtype=float)
        self.x, self._open = both[:, :K], both[:, K:]

    def add_jump(self, jump: np.ndarray) -> None:
        """A state jump told of after its time (a late announcement, a pump's own amount
        for a bolus counted before): every candidate takes it now."""
        column = np.asarray(jump, float).reshape(-1, 1)
        self.x = self.x + column
        self._open = self._open + column

    def _choice(self, t_s: float, u: np.ndarray) -> int:
        """The candidate to use from *t_s*: the best-scoring one; with caution, of those
        scoring within ``cautious_within`` of it the one whose output the probe moves most
        (at the rates *u* now, over lead_s: the candidate that plans the least drug). The
        one in use stays while it is within ``switch_margin`` of that choice: its score
        (it is still among the near ones, the margin widening the set) and, with caution,
        its probed effect."""
        c, current = self.config, self.current
        best = int(np.argmin(self.scores))
        widened = (1.0 + c.cautious_within) / (1.0 - c.switch_margin)
        keeps = self.scores[current] <= widened * self.scores[best]
        if c.cautious_within <= 0:
            return current if keeps else best
        near = np.flatnonzero(self.scores <= (1.0 + c.cautious_within) * self.scores[best])
        lead, K = c.lead_s, self.thetas.shape[0]
        clock = np.full((1, K), t_s + lead)
        base = np.asarray(self._output(self._advance(self.x, t_s, t_s + lead, u),
                                       self.thetas.T, clock)).ravel()
        probed = np.asarray(self._output(self._advance(self.x, t_s, t_s + lead,
                                                       u + self._probe),
                                         self.thetas.T, clock)).ravel()
        effect = np.abs(probed - base)
        choice = int(near[np.argmax(effect[near])])
        if keeps and effect[choice] <= (1.0 + c.switch_margin) * effect[current]:
            return current
        return choice

    def update(self, t_s: float, u0: np.ndarray,
               events: Sequence[tuple[float, np.ndarray | None, np.ndarray | None]],
               measured: float | None) -> tuple[np.ndarray, np.ndarray, bool]:
        """Move every candidate to *t_s* from the last update through *events* (time,
        new rates or None, state jump or None; in time order; *u0* the rates in force at
        the last update), score their open-loop predictions against *measured* (the
        latest reading, None when there is no new one), correct their states, and choose.

        Returns the chosen candidate's ``(state, parameters, changed)``.
        """
        t, u = self._t, np.asarray(u0, float)
        for t_event, u_next, jump in events:
            if t_event > t:
                self._advance_both(t, t_event, u)
                t = t_event
            if jump is not None:  # boluses and meals enter alike (the same units)
                self.x = self.x + np.asarray(jump, float).reshape(-1, 1)
                self._open = self._open + np.asarray(jump, float).reshape(-1, 1)
            else:
                u = np.asarray(u_next, float)
        self._advance_both(t, t_s, u)
        decay = math.exp(-(t_s - self._t) / self.config.forget_s)
        self._t = t_s
        if measured is not None and math.isfinite(measured) and measured > 0:
            K = self.thetas.shape[0]
            clock = np.full((1, K), t_s)
            predicted_open = np.asarray(self._output(self._open, self.thetas.T, clock)).ravel()
            # relative errors (in log): a miss near a low counts as much as a proportionally
            # equal one high up (absolute errors let the hours after meals pick the
            # candidate, and the lows are where a wrong one hurts)
            error = np.log(np.maximum(predicted_open, 1e-3 * measured) / measured)
            self.scores = self.scores * decay + error ** 2
            if self._states:
                predicted = np.asarray(self._output(self.x, self.thetas.T, clock)).ravel()
                ratio = np.where(predicted > 0, measured / np.where(predicted > 0, predicted,
                                                                     1.0), 1.0)
                self.x[self._states, :] *= ratio ** self._gain
        else:
            self.scores = self.scores * decay
        if t_s - self._open_from >= self.config.lead_s - 1e-9:
            self._open = self.x.copy()
            self._open_from = t_s
        changed = False
        if t_s >= self.config.warmup_s:
            choice = self._choice(t_s, u)
            if choice != self.current:
                self.switches.append((t_s, self.current, choice))
                self.current, changed = choice, True
        return self.x[:, self.current].copy(), self.thetas[self.current].copy(), changed
