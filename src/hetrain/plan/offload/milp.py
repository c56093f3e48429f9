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

from hetrain.plan.offload.graph import Choice, OffloadPrices

LOAD_WEIGHT = 1e-3
"""Objective weight of the summed resource loads: among plans of equal step time, the one that
does the least work (no copy, recomputation or CPU update that buys nothing)."""
PEAK_WEIGHT = 1e-4
"""Objective weight of the device peak (in budget units): then the one with the most headroom."""
INF = math.inf
BUDGET_MARGIN = 1e-6
"""Scaled units by which the solver's budgets are tighter than the closed form's."""


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
    """Seconds per step of each resource: compute (the main thread, waits included), h2d, d2h,
    cpu_optim; on a CPU device, cores (main thread and worker together) instead of the copies."""
    waits_s: float
    """Of compute, the main thread's waits: for CPU updates to land, the global norm, fetches."""
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
        self._defs_compiled: list = []
        terms, n_layers = prices.terms, len(prices.terms)
        resident_bytes = prices.static_device_bytes(((0, 0, 0),) * n_layers) + sum(
            t.saved_keep_bytes + t.grad_bytes for t in terms)
        self.byte_unit = float(max(resident_bytes, 1))
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
        self.saved = self._cumulative("saved", [
            _Expr(t.saved_keep_bytes / B).add(self.r[l], -(t.saved_keep_bytes - t.saved_recompute_bytes) / B)
            for l, t in enumerate(terms)])
        # Device-optimised gradients appear in backward (head first) and stay until the update;
        # with several micro-batches every one is held from the first micro-batch on.
        grads = self._cumulative("grads", [_Expr(t.grad_bytes / B).add(self.c[l], -t.grad_bytes / B)
                                           for l, t in reversed(list(enumerate(terms)))])[::-1]
        if st.grad_accum > 1:
            grads = [grads[0]] * L
        positions = []
        for l, t in enumerate(terms):  # the backward of layer l: its own recomputation and gradient
            e = _Expr(t.transient_bytes / B).add(self.static, 1).add(self.saved[l], 1).add(grads[l], 1)
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
    def _cumulative(self, name: str, per_layer: list[_Expr]) -> list[int]:
        """Variables holding the running sums of `per_layer`, in the order given."""
        out, prev = [], None
        for l, e in enumerate(per_layer):
            if prev is not None:
                e.add(prev, 1)
            prev = self._define(f"{name}{l}", "eq", [e], lb=-INF)
            out.append(prev)
        return out

    def _running_max(self, name: str, per_layer: list[_Expr]) -> list[int]:
        """Variables holding max(expr_0 .. expr_l) for each layer l."""
        out, prev = [], None
        for l, e in enumerate(per_layer):
            exprs = [e] + ([_Expr().add(prev, 1)] if prev is not None else [])
            prev = self._define(f"{name}{l}", "max", exprs, lb=-INF)
            out.append(prev)
        return out

    def _time(self) -> None:
        """The step as the main thread sees it, counted from the end of the previous step's
        backward: the wait for the global norm, the norm and the device update, the first
        micro-batch's forward (each layer waits for its CPU update to land and for its weight
        fetch), the backward (each layer waits for its fetch), further micro-batches; plus the
        loads of the copy engines and the CPU worker, which bound the step from below too."""
        p, st, U = self.prices, self.prices.settings, self.time_unit
        terms, L, n = p.terms, len(p.terms), st.grad_accum
        s, c, z, r = self.s, self.c, self.z, self.r
        device_optim = _Expr((p.device_optim_call_s + sum(t.optim_device_s for t in terms)) / U)
        for l, t in enumerate(terms):
            device_optim.add(c[l], -t.optim_device_s / U)
        self.device_optim = self._define("device_optim", "eq", [device_optim])
        # Layer l's last gradient lands bwd_before[l] before the backward ends: the backward
        # (and recomputation) of the layers below it is still to run.
        below = [_Expr()] + [_Expr(t.bwd_s / U).add(r[l], t.recompute_s / U) for l, t in enumerate(terms[:-1])]
        bwd_before = self._cumulative("bwd_before", below)
        # The CPU worker serves the lowest layer first: layers 0..l are done no earlier than any
        # layer k <= l is released plus the work of layers 0..k (all released at or after it).
        update_work = [_Expr().add(c[l], t.optim_host_s / U) for l, t in enumerate(terms)]
        if not st.async_copies:  # the worker uploads a resident copy itself
            for l, t in enumerate(terms):
                update_work[l].add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
        updates = self._cumulative("cpu_update", update_work)
        start = _Expr((p.norm_s) / U).add(self.device_optim, 1)  # when the next forward may start
        land = _Expr(p.norm_s / U)  # when the clipped CPU updates start
        accums = None
        if st.async_copies:
            # The global norm needs every host accumulation of the last micro-batch; those of the
            # layers the backward reaches last run past its end.
            accums = self._cumulative("cpu_accumulate", [_Expr().add(c[l], t.host_accumulate_s / U)
                                                         for l, t in enumerate(terms)])
            self.norm_wait = self._define("norm_wait", "max", [
                _Expr().add(bwd_before[l], -1).add(accums[l], 1).add(c[l], t.d2h_s / U) for l, t in enumerate(terms)])
            start.add(self.norm_wait, 1)
            land.add(self.norm_wait, 1)
        if st.clip:
            latest = self._running_max("cpu_latest", [_Expr(land.const, dict(land.coefs)).add(u, 1) for u in updates])
        else:  # each update may start once its gradient is in, during the backward
            work = [_Expr().add(bwd_before[l], -1).add(updates[l], 1) for l in range(L)]
            for l in range(L):
                if accums is not None:
                    work[l].add(accums[l], 1)
            latest = self._running_max("cpu_latest", work)
        landed = [_Expr().add(latest[l], 1).add(c[l], t.h2d_s / U if st.async_copies else 0.0)
                  for l, t in enumerate(terms)]
        if not st.overlap:  # the step returns once every update has landed
            start = _Expr(start.const, dict(start.coefs))
            first = self._define("all_landed", "max", [start, *landed])
            start, landed = _Expr().add(first, 1), []
        forward_end = self._forward("fwd", start, landed)
        backward = self._backward()
        compute = _Expr().add(forward_end, 1).add(backward, n)
        if n > 1:
            compute.add(self._forward("fwd_next", _Expr(), []), n - 1)
        # What the main thread does, without its waits: compute below, plus copies without streams.
        work = _Expr((p.norm_s + n * sum(t.fwd_s + t.bwd_s for t in terms)) / U).add(self.device_optim, 1)
        h2d, d2h, cpu = _Expr(), _Expr(), _Expr()
        for l, t in enumerate(terms):
            work.add(r[l], n * t.recompute_s / U)
            if n > 1:
                for e in (compute, work):
                    e.const += (n - 1) * t.device_accumulate_s / U
                    e.add(c[l], -(n - 1) * t.device_accumulate_s / U)
            cpu.add(c[l], t.optim_host_s / U)
            if st.async_copies:
                h2d.add(s[l], n * t.fetches_per_microbatch * t.h2d_s / U).add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
                d2h.add(c[l], n * t.d2h_s / U).add(s[l], t.d2h_s / U).add(z[l], -t.d2h_s / U)
                cpu.add(c[l], n * t.host_accumulate_s / U)
            else:  # fetches, gradient offload and the host store's refresh run on the main thread
                compute.add(s[l], t.d2h_s / U).add(z[l], -t.d2h_s / U)
                work.add(s[l], t.d2h_s / U).add(z[l], -t.d2h_s / U)
                work.add(c[l], n * t.host_accumulate_s / U)
                for v, coef in self._fetch_s(l).coefs.items():
                    compute.add(v, n * coef)
                    work.add(v, n * coef)
                if 0 < l < len(terms) - 1:
                    work.add(s[l], n * t.h2d_s / U)  # the backward's fetch
                cpu.add(c[l], t.h2d_s / U).add(z[l], -t.h2d_s / U)
        loads = [("compute", compute), ("h2d", h2d), ("d2h", d2h), ("cpu_optim", cpu)]
        if not st.async_copies:
            # On a CPU device the worker and the main thread share the cores: their work adds up.
            cores = _Expr(work.const + cpu.const, dict(work.coefs))
            for v, coef in cpu.coefs.items():
                cores.add(v, coef)
            loads = [("compute", compute), ("cpu_optim", cpu), ("cores", cores)]
        self.loads = {name: self._define(f"load_{name}", "eq", [e]) for name, e in loads}
        self.step = self._define("step", "max", [_Expr().add(v, 1) for v in self.loads.values()])
        wait = _Expr(-work.const, {v: -coef for v, coef in work.coefs.items()}).add(self.loads["compute"], 1)
        self.waits = self._define("waits", "eq", [wait], lb=-INF)

    def _fetch_s(self, l: int) -> _Expr:
        """Host-to-device time of what layer l reads from host memory (its own weights, and the
        embedding matrix for a tied head)."""
        terms, U = self.prices.terms, self.time_unit
        e = _Expr().add(self.s[l], terms[l].h2d_s / U)
        if self.prices.settings.tied_embeddings and l == len(terms) - 1:
            e.add(self.s[0], terms[0].h2d_s / U)
        return e

    def _forward(self, name: str, start: _Expr, landed: list[_Expr]) -> int:
        """The end of a forward, the later of two chains from `start`: layer l runs after layer
        l-1 and after its CPU update landed (`landed[l]`, first micro-batch only); or after
        layer l-1 and after its weights were fetched, a copy issued as layer l-1 starts
        (prefetch depth 1). The later of two chains misses a fetch wait that follows an update
        wait; in exchange interior blocks stay interchangeable (`_break_symmetry`). On a CPU
        device fetches run on the main thread and are added outside the chains."""
        terms, U = self.prices.terms, self.time_unit
        ends = []
        chains = [("land", landed)] + ([("fetch", None)] if self.prices.settings.async_copies else [])
        for chain, waits in chains:
            prev = None
            for l, t in enumerate(terms):
                if prev is None:
                    exprs = [_Expr(start.const, dict(start.coefs))]
                    if chain == "fetch":
                        for v, coef in self._fetch_s(l).coefs.items():
                            exprs[0].add(v, coef)
                else:
                    exprs = [_Expr(terms[l - 1].fwd_s / U).add(prev, 1)]
                    if chain == "fetch":
                        exprs.append(self._fetch_s(l).add(prev, 1))
                if waits:
                    exprs.append(waits[l])
                prev = self._define(f"{name}_{chain}{l}", "max", exprs, lb=-INF)
            ends.append(_Expr(terms[-1].fwd_s / U).add(prev, 1))
        return self._define(f"{name}_end", "max", ends, lb=-INF)

    def _backward(self) -> int:
        """A backward's duration, head first: layer l's backward starts once layer l+1 has
        recomputed (when it does) and run its backward, or once layer l's weights are fetched,
        whichever is later; the fetch is issued as layer l+1's backward starts, and the model
        counts it against layer l+1's backward alone, not its recomputation (conservative, and it
        keeps interior blocks interchangeable, see `_break_symmetry`). On a CPU device copies and
        the host gradient work run on the main thread and add up. The head's weights are still
        in their buffer from its forward; the embedding's backward reads none."""
        p, U, sync = self.prices, self.time_unit, not self.prices.settings.async_copies
        terms, last = p.terms, len(p.terms) - 1
        prev = self._define(f"bwd_start{last}", "max", [_Expr()], lb=-INF)
        for l in range(last - 1, -1, -1):
            k = l + 1
            done = _Expr().add(prev, 1).add(self.r[k], terms[k].recompute_s / U)
            run = _Expr(done.const + terms[k].bwd_s / U, dict(done.coefs))
            fetch = _Expr(done.const, dict(done.coefs)).add(self.s[l], terms[l].h2d_s / U) if l > 0 else None
            if sync:
                run.add(self.c[k], terms[k].host_accumulate_s / U)
                if fetch is not None:
                    run.add(self.s[l], terms[l].h2d_s / U)
                fetch = None
            prev = self._define(f"bwd_start{l}", "max", [run] + ([fetch] if fetch is not None else []), lb=-INF)
        end = _Expr(terms[0].bwd_s / U).add(prev, 1)
        if sync:
            end.add(self.c[0], terms[0].host_accumulate_s / U)
        return self._define("bwd_end", "eq", [end])

    def _break_symmetry(self) -> None:
        """Rows that keep one of many equivalent optima. The model prices the interior blocks
        (all but the first and last, whose neighbours differ) identically except for their
        position, and three exchanges between them are never worse (docs/offload.md gives the
        arguments): a CPU-updated block i and a device-updated block j > i trade their (weights,
        optimizer) pairs; among blocks with the same optimizer placement streaming moves to the
        earlier one (in fp32 among CPU-updated blocks only); recomputation moves from block i+1
        to block i, always when a block's saved activations A exceed what block i holds over
        block i+1 in its backward (its gradient G with one micro-batch, plus the gradient copy
        4F in fp32), else among CPU-updated blocks. Applied until none applies, they end at
        an optimum where the CPU updates a suffix, c_i <= c_(i+1); streaming comes first within
        an optimizer placement, s_(i+1) <= s_i + c_(i+1) - c_i (fp32: s_i + 1 - c_i); and
        recomputation is a prefix, r_(i+1) <= r_i (+ 1 - c_i when A is below G + 4F)."""
        st = self.prices.settings
        fp32 = st.fp32
        interior = [l for l, t in enumerate(self.prices.terms) if t.is_block][1:-1]
        for i, j in zip(interior, interior[1:]):
            t = self.prices.terms[i]
            held_diff = (t.grad_bytes if st.grad_accum == 1 else 0) + (t.compute_bytes if fp32 else 0)
            e = _Expr().add(self.r[i], 1).add(self.r[j], -1)
            if t.saved_keep_bytes < held_diff:
                e.const += 1
                e.add(self.c[i], -1)
            self.orderings.append(e)
            self.orderings.append(_Expr().add(self.c[j], 1).add(self.c[i], -1))
            e = _Expr().add(self.s[i], 1).add(self.s[j], -1)
            if fp32:
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
        for var, kind, parts in self._compiled():
            vals = [const + x[:, idx] @ coefs for const, idx, coefs in parts]
            if kind == "eq":
                x[:, var] = vals[0]
            elif kind == "max":
                x[:, var] = np.maximum.reduce([np.full(len(choices), self.lb[var]), *vals])
            else:
                x[:, var] = np.minimum.reduce([np.full(len(choices), self.ub[var]), *vals])
        return x

    def _compiled(self) -> list[tuple[int, str, list[tuple[float, np.ndarray, np.ndarray]]]]:
        if len(self._defs_compiled) != len(self.defs):
            self._defs_compiled = [(var, kind, [(e.const, np.fromiter(e.coefs, int, len(e.coefs)),
                                                 np.fromiter(e.coefs.values(), float, len(e.coefs))) for e in exprs])
                                   for var, kind, exprs in self.defs]
        return self._defs_compiled

    def feasible(self, x: np.ndarray, rel_tol: float = 1e-9) -> np.ndarray:
        """Which rows of `values()` fit both budgets."""
        return (x[:, self.peak] <= self.ub[self.peak] * (1 + rel_tol)) & (x[:, self.host] <= self.ub[self.host] * (1 + rel_tol))

    def objective_values(self, x: np.ndarray) -> np.ndarray:
        obj = self.objective()
        return obj.const + x[:, list(obj.coefs)] @ np.fromiter(obj.coefs.values(), float)

    def evaluate(self, choice: Choice, solve_s: float = 0.0) -> Solution:
        """`choice` and its figures under the model (the closed form of `values`, for one row)."""
        x = [0.0] * len(self.names)
        for l, (r, s, c) in enumerate(choice):
            x[self.r[l]], x[self.s[l]], x[self.c[l]] = float(r), float(s), float(c)
        for var, kind, exprs in self.defs:
            vals = [e.const + sum(coef * x[v] for v, coef in e.coefs.items()) for e in exprs]
            if kind == "eq":
                x[var] = vals[0]
            elif kind == "max":
                x[var] = max(self.lb[var], *vals)
            else:
                x[var] = min(self.ub[var], *vals)
        pos = [e.const + sum(coef * x[v] for v, coef in e.coefs.items()) for e in self.positions]
        objective = self.objective()
        return Solution(choice=choice,
                        objective=objective.const + sum(coef * x[v] for v, coef in objective.coefs.items()),
                        step_s=x[self.step] * self.time_unit, peak_device_bytes=x[self.peak] * self.byte_unit,
                        host_bytes=x[self.host] * self.byte_unit,
                        loads_s={k: x[v] * self.time_unit for k, v in self.loads.items()},
                        waits_s=x[self.waits] * self.time_unit, peak_layer=int(np.argmax(pos)), solve_s=solve_s)

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
        # HiGHS may exceed a row by its feasibility tolerance (1e-7 in these scaled units): keep
        # the budgets that much tighter, so its solutions fit in the closed form too.
        ub = list(self.ub)
        for v in (self.peak, self.host):
            ub[v] -= BUDGET_MARGIN
        res = milp(obj, integrality=np.array(self.integer), bounds=Bounds(self.lb, ub),
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
