"""The offload planner's linear model: per-layer binaries, memory rows, time rows, and their solve.

`OffloadModel` states, once, every quantity of the planner's linear model as a definition over
the per-layer binaries r (recompute), s (stream weights) and c (CPU optimizer): an equality
(`aux = expr`), a maximum (`aux >= each expr`) or a minimum (`aux <= each expr`). From the same
definitions it builds the MILP for HiGHS (scipy.optimize.milp) and evaluates any assignment in
closed form, which is how the tests check the solver against exhaustive enumeration. Every
auxiliary is monotone in the objective (a larger maximum or a smaller minimum never helps), so
the MILP's optimum equals the best closed-form value. Bytes are scaled by `byte_unit` and
seconds by `time_unit` so that both kinds of rows are of order one. The formulation is written
out in docs/offload.md. This module models and solves; it must not build plans, simulate, or
decide which solution to use.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from hetrain.plan.offload_graph import Choice, OffloadPrices

LOAD_WEIGHT = 1e-3
"""Objective weight of the summed resource loads: among plans of equal step time, the one that
does the least work (no copy, recomputation or CPU update that buys nothing)."""
PEAK_WEIGHT = 1e-4
"""Objective weight of the device peak (in budget units): then the one with the most headroom."""
INF = math.inf


@dataclass
class _Expr:
    const: float = 0.0
    coefs: dict[int, float] = field(default_factory=dict)

    def add(self, var: int, coef: float) -> "_Expr":
        if coef:
            self.coefs[var] = self.coefs.get(var, 0.0) + coef
        return self


@dataclass
class Solution:
    """One assignment and its figures under the linear model (bytes and seconds, unscaled)."""

    choice: Choice
    objective: float
    """The scaled objective: step time plus the tie-breaking terms."""
    step_s: float
    peak_device_bytes: float
    host_bytes: float
    loads_s: dict[str, float]
    """compute (with stalls), h2d, d2h, cpu_optim."""
    stall_s: float
    """Wait of the next forward for CPU updates that did not fit in the overlap window."""
    peak_layer: int
    """Index of the layer whose backward holds the device peak."""
    solve_s: float = 0.0


class OffloadModel:
    """The linear model of one model, batch and pair of budgets; see the module docstring."""

    def __init__(self, prices: OffloadPrices, device_budget_bytes: float | None, host_budget_bytes: float | None,
                 objective: str = "time"):
        if objective not in ("time", "peak", "host"):
            raise ValueError(f"objective must be 'time', 'peak' or 'host', got {objective!r}")
        self.prices, self.objective_kind = prices, objective
        self.names: list[str] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.defs: list[tuple[int, str, list[_Expr]]] = []
        self.cuts: list[Choice] = []
        terms, n_layers = prices.terms, len(prices.terms)
        self.byte_unit = float(max(self._resident_bytes(), 1))
        self.time_unit = max(sum(t.fwd_s + t.bwd_s for t in terms) * prices.settings.grad_accum, 1e-12)
        self.r = [self._var(f"r{l}", ub=1.0 if terms[l].is_block else 0.0, integer=True) for l in range(n_layers)]
        self.s = [self._var(f"s{l}", ub=1.0, integer=True) for l in range(n_layers)]
        self.c = [self._var(f"c{l}", ub=1.0, integer=True) for l in range(n_layers)]
        self.orderings: list[_Expr] = []  # rows expr >= 0 that only remove equivalent assignments
        self._memory(device_budget_bytes, host_budget_bytes)
        self._time()
        self._break_symmetry()

    # --- building blocks ---------------------------------------------------------------------
    def _var(self, name: str, lb: float = 0.0, ub: float = INF, integer: bool = False) -> int:
        self.names.append(name)
        self.lb.append(lb)
        self.ub.append(ub)
        self.integer.append(int(integer))
        return len(self.names) - 1

    def _define(self, name: str, kind: str, exprs: list[_Expr], lb: float = 0.0, ub: float = INF,
                integer: bool = False) -> int:
        var = self._var(name, lb, ub, integer)
        self.defs.append((var, kind, exprs))
        return var

    def _resident_bytes(self) -> int:
        p = self.prices
        return p.static_device_bytes(((0, 0, 0),) * len(p.terms)) + sum(
            t.saved_keep_bytes + t.grad_bytes for t in p.terms)

    # --- memory ------------------------------------------------------------------------------
    def _memory(self, device_budget_bytes: float | None, host_budget_bytes: float | None) -> None:
        p, st, B = self.prices, self.prices.settings, self.byte_unit
        terms, L = p.terms, len(p.terms)
        # z = s * c: a streamed layer updated on the CPU keeps nothing resident and one host copy.
        self.z = [self._define(f"z{l}", "min", [_Expr().add(self.s[l], 1), _Expr().add(self.c[l], 1)], ub=1.0)
                  for l in range(L)]
        self.m = self._define("largest_streamed", "max",
                              [_Expr().add(self.s[l], terms[l].compute_bytes / B) for l in range(L)])
        static = _Expr(p.model_buffers_bytes / B).add(self.m, st.weight_buffers)
        host = _Expr()
        for l, t in enumerate(terms):
            s, c, z = self.s[l], self.c[l], self.z[l]
            static.const += t.device_state_bytes(0, 0, st) / B
            if st.fp32:
                static.add(z, -4 * t.flat_numel / B).add(c, -t.adam_bytes / B)
            else:
                static.add(c, -(4 * t.flat_numel + t.adam_bytes) / B).add(s, -t.compute_bytes / B)
            host.add(s, t.compute_bytes / B).add(z, -t.compute_bytes / B).add(c, t.host_optim_bytes(st) / B)
        self.static = self._define("static_device", "eq", [static])
        # Saved activations accumulate in forward: keep -> what the block saves, recompute -> its input.
        self.saved, prev = [], None
        for l, t in enumerate(terms):
            e = _Expr(t.saved_keep_bytes / B).add(self.r[l], -(t.saved_keep_bytes - t.saved_recompute_bytes) / B)
            if prev is not None:
                e.add(prev, 1)
            prev = self._define(f"saved{l}", "eq", [e])
            self.saved.append(prev)
        # Device-optimised gradients appear in backward and stay until the update; with several
        # micro-batches, every one is held from the first micro-batch on.
        grads, prev = [0] * L, None
        for l in range(L - 1, -1, -1):
            e = _Expr(terms[l].grad_bytes / B).add(self.c[l], -terms[l].grad_bytes / B)
            if prev is not None:
                e.add(prev, 1)
            grads[l] = prev = self._define(f"grads{l}", "eq", [e])
        if st.grad_accum > 1:
            grads = [grads[0]] * L
        positions = []
        for l, t in enumerate(terms):  # the backward of layer l: its own recomputation and gradient
            e = _Expr().add(self.static, 1).add(self.saved[l], 1).add(grads[l], 1)
            e.add(self.r[l], t.recompute_bytes / B)
            if st.fp32:
                e.add(self.s[l], t.compute_bytes / B).add(self.c[l], t.compute_bytes / B).add(
                    self.z[l], -t.compute_bytes / B)
            else:
                e.const += t.compute_bytes / B
            positions.append(e)
        self.positions = positions
        device_ub = INF if device_budget_bytes is None else device_budget_bytes / B
        host_ub = INF if host_budget_bytes is None else host_budget_bytes / B
        self.peak = self._define("peak_device", "max", positions, ub=device_ub)
        self.host = self._define("host", "eq", [host], ub=host_ub)

    # --- time --------------------------------------------------------------------------------
    def _time(self) -> None:
        p, st, U = self.prices, self.prices.settings, self.time_unit
        terms, L, n = p.terms, len(p.terms), st.grad_accum
        s, c, z, r = self.s, self.c, self.z, self.r
        device_optim = _Expr((p.device_optim_call_s + sum(t.optim_device_s for t in terms)) / U)
        for l, t in enumerate(terms):
            device_optim.add(c[l], -t.optim_device_s / U)
        self.device_optim = self._define("device_optim", "eq", [device_optim])
        # Cumulative CPU update work in priority order (lowest layer first), and the latest any
        # of layers 0..l can finish relative to the moment the updates may start.
        updates, prev, latest = [], None, None
        bwd_before_s = 0.0
        for l, t in enumerate(terms):
            e = _Expr().add(c[l], t.optim_host_s / U)
            if not st.async_copies:  # the worker uploads a resident copy itself
                e.add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
            if prev is not None:
                e.add(prev, 1)
            prev = self._define(f"cpu_done{l}", "eq", [e])
            # Without clipping, layer l's update may start once the backward of layers < l remains.
            head_start = 0.0 if st.clip else (bwd_before_s + p.norm_s)
            exprs = [_Expr(-head_start / U).add(prev, 1)] + ([_Expr().add(latest, 1)] if latest is not None else [])
            latest = self._define(f"cpu_latest{l}", "max", exprs, lb=-INF)
            updates.append(latest)
            bwd_before_s += t.bwd_s
        stall_exprs = []
        fwd_before_s = 0.0
        for l, t in enumerate(terms):
            e = _Expr(-fwd_before_s / U if st.overlap else 0.0).add(updates[l], 1).add(self.device_optim, -1)
            if st.async_copies:
                e.add(c[l], t.h2d_s / U)  # the upload (or fetch) of its updated weights
            stall_exprs.append(e)
            fwd_before_s += t.fwd_s
        self.stall = self._define("stall", "max", stall_exprs)

        compute = _Expr((n * sum(t.fwd_s + t.bwd_s for t in terms) + p.norm_s) / U)
        compute.add(self.device_optim, 1).add(self.stall, 1)
        h2d, d2h, cpu = _Expr(), _Expr(), _Expr()
        for l, t in enumerate(terms):
            compute.add(r[l], n * t.recompute_s / U)
            if n > 1:
                compute.const += (n - 1) * t.device_accumulate_s / U
                compute.add(c[l], -(n - 1) * t.device_accumulate_s / U)
            cpu.add(c[l], t.optim_host_s / U)
            if st.async_copies:
                compute.add(s[l], n * self._fetch_stall_s(l) / U)
                h2d.add(s[l], n * t.fetches_per_microbatch * t.h2d_s / U).add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
                d2h.add(c[l], n * t.d2h_s / U).add(s[l], t.d2h_s / U).add(z[l], -t.d2h_s / U)
                cpu.add(c[l], n * t.host_accumulate_s / U)
            else:  # copies run on the thread that asks: fetches, gradient offload, refresh on the main one
                compute.add(s[l], n * t.fetches_per_microbatch * t.h2d_s / U)
                compute.add(c[l], n * t.host_accumulate_s / U)
                compute.add(s[l], t.d2h_s / U).add(z[l], -t.d2h_s / U)
                cpu.add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
        if st.async_copies:  # the first streamed use of a step is fetched on demand
            big = max(p.terms, key=lambda t: t.compute_bytes)
            compute.add(self.m, self.byte_unit * big.h2d_s / big.compute_bytes / U)
        self.loads = {name: self._define(f"load_{name}", "eq", [e])
                      for name, e in (("compute", compute), ("h2d", h2d), ("d2h", d2h), ("cpu_optim", cpu))}
        self.step = self._define("step", "max", [_Expr().add(v, 1) for v in self.loads.values()])

    def _fetch_stall_s(self, l: int) -> float:
        """Per micro-batch, what a streamed layer's fetches can add to the compute chain: each
        fetch is issued as the previous layer starts computing (prefetch depth 1), so at most
        the part of the copy longer than that layer's compute shows."""
        terms, last = self.prices.terms, len(self.prices.terms) - 1
        t = terms[l]
        if l == 0:
            stall = t.h2d_s + (max(0.0, t.h2d_s - terms[last - 1].fwd_s) if self.prices.settings.tied_embeddings else 0)
        elif l == last:
            stall = max(0.0, t.h2d_s - terms[l - 1].fwd_s)
        else:
            stall = max(0.0, t.h2d_s - terms[l - 1].fwd_s) + max(0.0, t.h2d_s - terms[l + 1].bwd_s)
        return stall

    def _break_symmetry(self) -> None:
        """Order the interior blocks (all but the first and last, whose neighbours differ), which
        the model prices identically except for their position. Exchanging the (s, c) pairs of
        interior blocks i < j with c_i = 1, c_j = 0 is never worse: the CPU work due before
        each forward shrinks, a device-optimised gradient is held over fewer backward positions,
        and everything else is the same (docs/offload.md gives the argument). So some optimum
        updates a suffix of the interior blocks on the CPU: c_i <= c_(i+1). Within one optimizer
        placement the streamed blocks come first, s_(i+1) <= s_i; in fp32 only among CPU-updated
        blocks, since a streamed device-optimised fp32 block holds a gradient copy that a
        resident one does not, at its own backward position."""
        interior = [l for l, t in enumerate(self.prices.terms) if t.is_block][1:-1]
        for i, j in zip(interior, interior[1:]):
            self.orderings.append(_Expr().add(self.c[j], 1).add(self.c[i], -1))
            e = _Expr().add(self.s[i], 1).add(self.s[j], -1)
            if self.prices.settings.fp32:
                e.const += 1
                e.add(self.c[i], -1)
            else:
                e.add(self.c[j], 1).add(self.c[i], -1)
            self.orderings.append(e)

    # --- objective, evaluation, solve --------------------------------------------------------
    def objective(self) -> _Expr:
        if self.objective_kind == "peak":
            return _Expr().add(self.peak, 1)
        if self.objective_kind == "host":
            return _Expr().add(self.host, 1).add(self.peak, 1e-6)
        e = _Expr().add(self.step, 1).add(self.peak, PEAK_WEIGHT)
        for v in self.loads.values():
            e.add(v, LOAD_WEIGHT)
        return e

    def values(self, choices: list[Choice]) -> np.ndarray:
        """Every variable's value (columns) for each of `choices` (rows), in closed form, with
        the auxiliaries at their tight value: what the MILP's optimum has for that assignment."""
        x = np.zeros((len(choices), len(self.names)))
        picks = np.array(choices, dtype=float).reshape(len(choices), -1, 3)
        for k, group in enumerate((self.r, self.s, self.c)):
            x[:, group] = picks[:, :, k]
        for var, kind, exprs in self.defs:
            vals = [e.const + x[:, list(e.coefs)] @ np.fromiter(e.coefs.values(), float) if e.coefs
                    else np.full(len(choices), e.const) for e in exprs]
            if kind == "eq":
                x[:, var] = vals[0]
            elif kind == "max":
                x[:, var] = np.maximum.reduce([np.full(len(choices), self.lb[var]), *vals])
            else:
                x[:, var] = np.minimum.reduce([np.full(len(choices), self.ub[var]), *vals])
        return x

    def feasible(self, x: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
        """Which rows of `values()` fit both budgets."""
        return (x[:, self.peak] <= self.ub[self.peak] * (1 + rel_tol)) & (x[:, self.host] <= self.ub[self.host] * (1 + rel_tol))

    def objective_values(self, x: np.ndarray) -> np.ndarray:
        obj = self.objective()
        return obj.const + x[:, list(obj.coefs)] @ np.fromiter(obj.coefs.values(), float)

    def evaluate(self, choice: Choice, solve_s: float = 0.0) -> Solution:
        x = self.values([choice])
        pos = [e.const + sum(coef * x[0, v] for v, coef in e.coefs.items()) for e in self.positions]
        row = x[0]
        return Solution(choice=choice, objective=float(self.objective_values(x)[0]),
                        step_s=row[self.step] * self.time_unit, peak_device_bytes=row[self.peak] * self.byte_unit,
                        host_bytes=row[self.host] * self.byte_unit,
                        loads_s={k: float(row[v]) * self.time_unit for k, v in self.loads.items()},
                        stall_s=row[self.stall] * self.time_unit, peak_layer=int(np.argmax(pos)), solve_s=solve_s)

    def _matrix(self) -> tuple[coo_array, np.ndarray, np.ndarray]:
        rows, cols, vals, lo, hi = [], [], [], [], []

        def row(expr: _Expr, var: int, sign: float, low: float, high: float) -> None:
            i = len(lo)
            rows.append(i), cols.append(var), vals.append(sign)
            for v, coef in expr.coefs.items():
                rows.append(i), cols.append(v), vals.append(-sign * coef)
            lo.append(low), hi.append(high)

        for var, kind, exprs in self.defs:
            for e in exprs:  # var - expr (=, >=, <=) const
                if kind == "eq":
                    row(e, var, 1.0, e.const, e.const)
                elif kind == "max":
                    row(e, var, 1.0, e.const, INF)
                else:
                    row(e, var, 1.0, -INF, e.const)
        for e in self.orderings:
            i = len(lo)
            for v, coef in e.coefs.items():
                rows.append(i), cols.append(v), vals.append(coef)
            lo.append(-e.const), hi.append(INF)
        for cut in self.cuts:  # differ in at least one placement: sum over ones of (1 - x) + over zeros of x >= 1
            i, ones = len(lo), 0
            for l, (_, s, c) in enumerate(cut):
                for var, value in ((self.s[l], s), (self.c[l], c)):
                    rows.append(i), cols.append(var), vals.append(-1.0 if value else 1.0)
                    ones += value
            lo.append(1 - ones), hi.append(INF)
        a = coo_array((vals, (rows, cols)), shape=(len(lo), len(self.names)))
        return a, np.array(lo), np.array(hi)

    def solve(self, time_limit_s: float = 30.0, mip_rel_gap: float = 1e-6) -> Solution | None:
        """The MILP's optimum (None when no assignment fits the budgets); excludes `self.cuts`."""
        start = time.perf_counter()
        a, lo, hi = self._matrix()
        obj = np.zeros(len(self.names))
        for v, coef in self.objective().coefs.items():
            obj[v] = coef
        res = milp(obj, integrality=np.array(self.integer), bounds=Bounds(self.lb, self.ub),
                   constraints=LinearConstraint(a.tocsr(), lo, hi),
                   options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap, "presolve": True})
        solve_s = time.perf_counter() - start
        if res.x is None:
            if res.status == 2:  # infeasible
                return None
            raise RuntimeError(f"the offload MILP found no solution: {res.message}")
        choice = tuple((round(res.x[self.r[l]]), round(res.x[self.s[l]]), round(res.x[self.c[l]]))
                       for l in range(len(self.prices.terms)))
        return self.evaluate(choice, solve_s)

    def best(self, k: int, time_limit_s: float = 30.0, mip_rel_gap: float = 1e-6) -> list[Solution]:
        """Up to `k` best assignments in the MILP's order, each with other weight or optimizer
        placements than the ones before (a no-good cut over s and c; recomputation is then
        chosen afresh: assignments that differ only in which blocks recompute have the same
        time in the model and in the simulator). Assignments the closed form finds over a
        budget (solver round-off) are cut and skipped."""
        found: list[Solution] = []
        while len(found) < k:
            sol = self.solve(time_limit_s, mip_rel_gap)
            if sol is None:
                break
            self.cuts.append(sol.choice)
            if self.feasible(self.values([sol.choice]))[0]:
                found.append(sol)
        return found
