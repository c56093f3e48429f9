"""Selective recomputation inside blocks, on demand and ahead of the backward, equals no recomputation.

One process, CPU fp32, dropout on (on the attention probabilities too, or on the residual branches
only, as under tensor parallelism): a 3-block GPT's blocks run under unit policies of every family
(whole block, cheap units only, expensive units, mixed places, regions whose last step reruns) and
the loss and every gradient must be bitwise those of the plain model with the same seed. The
window path (recompute ahead of the backward under a GraphExecGroup) must be used by the backward
(no second recomputation) and must leave the random state of later forwards untouched.
"""

import dataclasses

import pytest
import torch

from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.pipeline.unit_recompute import Recomputations, apply_unit_recompute
from hetrain.plan.cluster.recompute_plan import DEMAND, UNITS, WINDOW, BlockPolicy

FAMILIES = {
    "keep": BlockPolicy.keep(),
    "whole on demand": BlockPolicy.whole(DEMAND),
    "whole in window": BlockPolicy.whole(WINDOW),
    "norms and activation in window": BlockPolicy.of(window=["norm1", "norm2", "act"]),
    "qkv alone (attn reruns)": BlockPolicy.of(demand=["qkv"]),
    "attention and residual": BlockPolicy.of(window=["attn", "proj"]),
    "mlp on demand, attention in window": BlockPolicy.of(window=["norm1", "qkv", "attn"], demand=["norm2", "up", "act"]),
    "activation alone": BlockPolicy.of(window=["act"]),
}


def _model(variant: dict, dropout: float) -> GPT:
    cfg = dataclasses.replace(get_preset("tiny"), n_layer=3, dropout=dropout, **variant)
    torch.manual_seed(0)
    return GPT(cfg)


def _grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(model: GPT, idx, targets, ledger: Recomputations | None, ahead: bool, micro_batches: int = 2):
    """Forward all micro-batches, then their backwards in order (as a pipeline stage holds them)."""
    torch.manual_seed(1)
    losses = []
    for m in range(micro_batches):
        ctx = ledger.forward(0, m) if ledger else torch.enable_grad()
        with ctx:
            losses.append(model(idx[m], targets[m]))
    for m in range(micro_batches):
        if ledger and ahead:
            ledger.recompute(0, m, stop=lambda: False)
        ctx = ledger.backward(0, m) if ledger else torch.enable_grad()
        with ctx:
            losses[m].backward()
    after = torch.rand(4)  # the random state after the step
    return [v.detach() for v in losses], _grads(model), after


@pytest.mark.parametrize("variant", [{}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2},
                                     {"dropout_attention": False}],
                         ids=["gpt", "llama", "gpt-residual-dropout"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("ahead", [False, True], ids=["backward only", "ahead"])
def test_policy_matches_plain_training_bitwise(variant, family, ahead):
    idx = torch.randint(0, 256, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=-1)
    plain = _model(variant, 0.2)
    want_losses, want_grads, want_after = _run(plain, idx, targets, None, False)

    model = _model(variant, 0.2)
    ledger = Recomputations()
    policy = FAMILIES[family]
    handle = apply_unit_recompute(list(model.blocks), [policy, BlockPolicy.keep(), policy], ledger)
    got_losses, got_grads, got_after = _run(model, idx, targets, ledger, ahead)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses))
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
    assert torch.equal(got_after, want_after), "recomputation must not move the random state"
    window_regions = 2 * 2 * len([r for r in policy.regions() if r[2] == WINDOW]) if not policy.is_keep else 0
    assert ledger.regions_ahead == (window_regions if ahead else 0)
    assert ledger.regions_left == (0 if ahead else window_regions)
    if ahead and window_regions and not policy.units_at(DEMAND):
        assert ledger.ahead_s > 0 and ledger.demand_s == 0.0, "the backward must use what was recomputed ahead"
    assert "forward" not in model.blocks[0].__dict__


def test_stopped_early_the_backward_recomputes_the_rest():
    idx = torch.randint(0, 256, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=-1)
    want_losses, want_grads, _ = _run(_model({}, 0.2), idx, targets, None, False)
    model = _model({}, 0.2)
    ledger = Recomputations()
    apply_unit_recompute(list(model.blocks), [BlockPolicy.whole(WINDOW)] * 3, ledger)
    torch.manual_seed(1)
    losses = []
    for m in range(2):
        with ledger.forward(0, m):
            losses.append(model(idx[m], targets[m]))
    for m in range(2):
        calls = iter([False, True])  # the wait ends after one region
        assert ledger.recompute(0, m, stop=lambda: next(calls, True)) == 1
        assert ledger.pending(0, m) == 2
        with ledger.backward(0, m):
            losses[m].backward()
    assert ledger.regions_ahead == 2 and ledger.regions_left == 4
    for name, g in want_grads.items():
        assert torch.equal(model.get_parameter(name).grad, g), name


def test_mixed_places_in_one_run_of_units_is_refused():
    with pytest.raises(ValueError, match="adjacent"):
        BlockPolicy.of(window=["qkv"], demand=["attn"])
    with pytest.raises(ValueError, match="distinct names"):
        BlockPolicy.of(window=["mlp"])
    assert len(UNITS) == 7


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("full_rerun", [False, True], ids=["early stop", "full rerun"])
def test_a_full_rerun_recomputes_the_whole_block_and_trains_the_same(full_rerun, dropout):
    """run.recompute_full_rerun (the Megatron-LM / reentrant baseline): a block recomputed on
    demand reruns its down projection too; torch's early stop (the default) does not, unless a
    dropout mask after it is saved. Same losses, gradients and random state either way."""
    idx = torch.randint(0, 256, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=-1)
    want_losses, want_grads, want_after = _run(_model({}, dropout), idx, targets, None, False)
    model = _model({}, dropout)
    ledger = Recomputations(full_rerun)
    apply_unit_recompute(list(model.blocks), [BlockPolicy.whole(DEMAND)] * 3, ledger)
    calls = []
    model.blocks[1].mlp.down.register_forward_hook(lambda *_: calls.append(1))
    got_losses, got_grads, got_after = _run(model, idx, targets, ledger, False)
    assert len(calls) == (4 if full_rerun or dropout else 2)  # 2 micro-batches: forward, and the rerun or not
    assert torch.equal(got_after, want_after)
    assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses))
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
