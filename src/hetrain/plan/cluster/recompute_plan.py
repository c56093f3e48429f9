"""The recomputation policy of a pipeline stage as plain data: what plan.json says and the runtime reads.

A block's forward is eight steps (hetrain.model.gpt): norm1, qkv, attn, proj, norm2, up, act,
down. Unit k (UNITS[k]) is the output of step k, which step k + 1 saves for backward. A policy
says, per unit of a block, whether it is kept, dropped and recomputed inside a wait of the
pipeline schedule (WINDOW: while the stage waits for the micro-batch's gradient), dropped and
recomputed inside the next block's tensor-parallel all-reduces in the backward (COLLECTIVE: the
block after it in the stage reduces its input gradients while this block's units are
recomputed), or dropped and recomputed when the block's backward needs it (DEMAND). A run of
adjacent dropped units is one checkpoint region over the steps around them, recomputed at once,
so it has one place. Whole-block recomputation drops all seven units. A COLLECTIVE region must
not rerun a row-parallel step (proj, down), which would need an all-reduce of its own, so the
unit `proj` is never COLLECTIVE; the stage's last block has no next block, so its COLLECTIVE
regions are recomputed on demand. A region ending at proj or down stops after the projection:
that projection's residual dropout (its mask) and residual add run outside the region, so the
mask is kept and nothing reruns the projection for it (`keeps_tail`); a whole block recomputed
on demand is the exception, torch's checkpoint of the block.

In plan.json a stage (StagePlan.recompute) reads, e.g.:

    {"blocks": [{"first_block": 0, "n_blocks": 6, "window": ["norm1", "qkv"], "demand": ["act"],
                 "collective": ["norm2", "up"]}],
     "predicted": {...}}

where every group names the blocks it covers (blocks not named keep everything) and
`predicted` is the planner's account (recompute seconds inside and outside waits, bytes freed
and held), for reading only. This module holds and checks that data; it must not price or
choose policies (hetrain.plan.cluster.recompute_units and recompute_policy do) nor run them
(hetrain.pipeline.unit_recompute does).
"""

from __future__ import annotations

from dataclasses import dataclass

STEPS = ("norm1", "qkv", "attn", "proj", "norm2", "up", "act", "down")
UNITS = STEPS[:-1]
"""Unit k is the output of STEPS[k], saved by STEPS[k + 1] (down's output is saved by nobody)."""
WINDOW, DEMAND, COLLECTIVE = "window", "demand", "collective"
PLACES = (WINDOW, COLLECTIVE, DEMAND)
NOT_COLLECTIVE = ("proj",)
"""Units whose recomputation reruns a row-parallel step (an all-reduce of its own)."""


ROW_STEPS = (STEPS.index("proj"), STEPS.index("down"))
"""The row-parallel projections: each ends with an all-reduce under tensor parallelism."""


def keeps_tail(first: int, last: int, place: str) -> bool:
    """Whether the region over steps first..last ends before its last step's residual dropout: a
    region ending at proj or down stops after the projection (its all-reduce included), and the
    dropout (its mask) and residual add run outside it, so the mask is kept and the projection is
    not rerun for it. The exception is a whole block recomputed on demand, which is torch's
    checkpoint of the block (the runtime's whole-block baseline, priced by the layer's
    recompute_s): it frees the mask and reruns the last projection to give it back."""
    whole_on_demand = first == 0 and last == len(STEPS) - 1 and place == DEMAND
    return last in ROW_STEPS and not whole_on_demand


@dataclass(frozen=True)
class BlockPolicy:
    """Where each unit of one block goes, by UNITS index: None (kept), WINDOW, COLLECTIVE or DEMAND."""

    places: tuple[str | None, ...]

    @classmethod
    def keep(cls) -> "BlockPolicy":
        return cls((None,) * len(UNITS))

    @classmethod
    def whole(cls, place: str = DEMAND) -> "BlockPolicy":
        """Every unit dropped: whole-block recomputation."""
        return cls((place,) * len(UNITS))

    @classmethod
    def of(cls, window=(), demand=(), collective=()) -> "BlockPolicy":
        """From unit names; ValueError for an unknown or doubly placed name, a run of adjacent
        dropped units with two places, or a COLLECTIVE unit in NOT_COLLECTIVE."""
        window, demand, collective = list(window), list(demand), list(collective)
        named = window + demand + collective
        unknown = sorted(set(named) - set(UNITS))
        if unknown or len(set(named)) != len(named):
            raise ValueError(f"recompute units must be distinct names among {', '.join(UNITS)}; got "
                             f"window={window} demand={demand} collective={collective}")
        bad = [u for u in collective if u in NOT_COLLECTIVE]
        if bad:
            raise ValueError(f"unit {bad[0]} reruns a row-parallel projection (an all-reduce of its own), so it "
                             f"cannot be recomputed inside another all-reduce; place it, and the dropped units "
                             f"next to it, 'demand'")
        places = {**dict.fromkeys(window, WINDOW), **dict.fromkeys(demand, DEMAND),
                  **dict.fromkeys(collective, COLLECTIVE)}
        policy = cls(tuple(places.get(u) for u in UNITS))
        policy.regions()
        return policy

    def regions(self) -> list[tuple[int, int, str]]:
        """(first step, last step, place) of each checkpoint region: a run of dropped units
        a..b-1 is one region over steps a..b."""
        out, k = [], 0
        while k < len(UNITS):
            if self.places[k] is None:
                k += 1
                continue
            a, place = k, self.places[k]
            while k < len(UNITS) and self.places[k] is not None:
                if self.places[k] != place:
                    raise ValueError(f"units {UNITS[a]} .. {UNITS[k]} are adjacent, so one recomputation, "
                                     f"but are placed both '{place}' and '{self.places[k]}'")
                k += 1
            out.append((a, k, place))
        return out

    @property
    def is_keep(self) -> bool:
        return all(p is None for p in self.places)

    @property
    def dropped(self) -> list[str]:
        return [u for u, p in zip(UNITS, self.places) if p is not None]

    def units_at(self, place: str) -> list[str]:
        return [u for u, p in zip(UNITS, self.places) if p == place]

    def describe(self) -> str:
        """Short text for reports: 'keep', 'all (demand)', 'norm1,qkv (window) + act (demand)'."""
        if self.is_keep:
            return "keep"
        parts = []
        for place in PLACES:
            names = self.units_at(place)
            if names:
                parts.append(f"{'all' if len(names) == len(UNITS) else ','.join(names)} ({place})")
        return " + ".join(parts)


def block_policies(recompute: dict, first_block: int, n_blocks: int, n_recompute_blocks: int) -> list[BlockPolicy]:
    """The policy of each block of a chunk (blocks first_block .. first_block + n_blocks - 1).

    `recompute` is the chunk's plan.json entry; when it is empty the first `n_recompute_blocks`
    blocks recompute whole on demand (the plan's older, coarser form). ValueError with the reason
    when the entry is malformed or names blocks outside the chunk."""
    policies = [BlockPolicy.keep() for _ in range(n_blocks)]
    groups = recompute.get("blocks", []) if recompute else []
    if groups and n_recompute_blocks:
        raise ValueError("a stage gives both n_recompute_blocks and a recompute policy; keep one")
    if not groups:
        for i in range(min(n_recompute_blocks, n_blocks)):
            policies[i] = BlockPolicy.whole()
        return policies
    for g in groups:
        try:
            first, count = int(g["first_block"]), int(g["n_blocks"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"recompute group {g!r} needs integer first_block and n_blocks") from None
        if count < 1 or first < first_block or first + count > first_block + n_blocks:
            raise ValueError(f"recompute group for blocks {first}..{first + count - 1} is outside the stage's "
                             f"blocks {first_block}..{first_block + n_blocks - 1}")
        policy = BlockPolicy.of(g.get("window", []), g.get("demand", []), g.get("collective", []))
        for b in range(first, first + count):
            if not policies[b - first_block].is_keep:
                raise ValueError(f"block {b} is in two recompute groups")
            policies[b - first_block] = policy
    return policies


def policy_groups(policies: list[BlockPolicy], first_block: int) -> list[dict]:
    """Consecutive blocks with one policy as plan.json groups (kept blocks are left out)."""
    groups: list[dict] = []
    for i, policy in enumerate(policies):
        if policy.is_keep:
            continue
        entry = {"window": policy.units_at(WINDOW), "demand": policy.units_at(DEMAND)}
        if policy.units_at(COLLECTIVE):
            entry["collective"] = policy.units_at(COLLECTIVE)
        last = groups[-1] if groups else None
        if last and last["first_block"] + last["n_blocks"] == first_block + i and \
                {k: v for k, v in last.items() if k not in ("first_block", "n_blocks")} == entry:
            last["n_blocks"] += 1
        else:
            groups.append({"first_block": first_block + i, "n_blocks": 1, **entry})
    return groups
