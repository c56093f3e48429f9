"""The offload engine against the textbook PyTorch loop: every plan trains the same model.

The reference is GPT + torch.optim.AdamW(fused=True) with weight decay on matrices only,
warmup-cosine learning rate, grad accumulation 2 and clip_grad_norm_(1.0). Every plan (each
of the 8 per-block choices on all blocks, prefix/suffix shapes, all pairs of embedding and
head placements with tied weights, random per-layer plans, an untied rotary model, bf16
compute, cross-iteration overlap on and off) must give the same losses and parameters after
10 steps, to 1e-6 relative. The rest checks the device budget accounting, the order of CPU
updates and forwards under overlap, checkpoints and clean-up.
"""

import dataclasses
import itertools
import math
import random
import threading
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from hetrain.memory import MemoryAccountant
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.offload import DeviceBudgetError, OptimConfig, apply_plan
from hetrain.plan.offload.plan import OffloadPlan
from tests_support import textbook_training

CFG = dataclasses.replace(get_preset("tiny"), n_layer=4)
LLAMA = dataclasses.replace(get_preset("tiny-llama"), n_layer=4)
STEPS, ACCUM, MICRO, SEQ = 10, 2, 2, 16
OPTIM = OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.95)


def lr_at(step: int, peak=3e-3, floor=3e-4, warmup=2) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (STEPS - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def make_batches(seed=1, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randint(0, 256, (MICRO, SEQ), generator=g), torch.randint(0, 256, (MICRO, SEQ), generator=g))
             for _ in range(ACCUM)] for _ in range(steps)]


BATCHES = make_batches()


def reference_run(cfg, clip=1.0, steps=STEPS, batches=BATCHES):
    """The textbook loop (tests_support.textbook_training) on hetrain's GPT."""
    torch.manual_seed(0)
    return textbook_training(GPT(cfg), batches[:steps], OPTIM, lr_at, ACCUM, clip)


_REFERENCES = {}


def reference(cfg=CFG, clip=1.0):
    key = (repr(cfg), clip)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(cfg, clip)
    return _REFERENCES[key]


def engine_run(plan, cfg=CFG, clip=1.0, steps=STEPS, dtype=torch.float32, trace=False, setup=None):
    torch.manual_seed(0)
    model = GPT(cfg)
    engine = apply_plan(model, plan, OPTIM, "cpu", compute_dtype=dtype, trace=trace)
    if setup is not None:
        setup(engine)
    try:
        stats = [engine.train_step(BATCHES[s], lr_at(s), clip) for s in range(steps)]
        state = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
        return [s.loss for s in stats], state, engine, stats
    finally:
        engine.close()


def assert_same_training(result, ref):
    losses, state = result[0], result[1]
    ref_losses, ref_state = ref
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)


def block_plan(choices, **settings) -> OffloadPlan:
    """A plan from one (act, weights, optim) triple per block; embedding and head resident."""
    plan = OffloadPlan.resident(len(choices), **settings)
    for i, (act, weights, optim) in enumerate(choices):
        b = plan.block(i)
        b.act, b.weights, b.optim = act, weights, optim
    return plan


TRIPLES = list(itertools.product(("keep", "recompute"), ("device", "host"), ("device", "host")))


@pytest.mark.parametrize("triple", TRIPLES, ids=["-".join(t) for t in TRIPLES])
def test_uniform_block_choices_train_like_plain_pytorch(triple):
    assert_same_training(engine_run(block_plan([triple] * 4)), reference())


SHAPES = [(1, 1, 1), (2, 3, 1), (3, 1, 2), (0, 4, 4)]


@pytest.mark.parametrize("recompute,stream,cpu_optim", SHAPES)
def test_prefix_suffix_plans_train_like_plain_pytorch(recompute, stream, cpu_optim):
    plan = OffloadPlan.prefix_suffix(4, recompute=recompute, stream=stream, cpu_optim=cpu_optim)
    assert_same_training(engine_run(plan), reference())


PLACES = list(itertools.product(("device", "host"), ("device", "host")))
# An orthogonal array over (embedding weights, embedding optim, head weights, head optim):
# every pair of choices of any two of the four appears, all-device and all-host included.
EDGE_PLANS = [(0, 0, 0, 0), (0, 0, 1, 1), (0, 1, 0, 1), (0, 1, 1, 0),
              (1, 0, 0, 1), (1, 0, 1, 0), (1, 1, 0, 0), (1, 1, 1, 1)]


@pytest.mark.parametrize("choice", EDGE_PLANS, ids=["".join("dh"[c] for c in row) for row in EDGE_PLANS])
def test_embedding_and_head_placements_with_tied_weights(choice):
    # The tied matrix belongs to the embedding; the head reads it wherever it lives.
    plan = OffloadPlan.prefix_suffix(4, recompute=1, stream=1, cpu_optim=1, weight_buffers=3)
    places = [("device", "host")[c] for c in choice]
    plan.layer("embedding").weights, plan.layer("embedding").optim = places[:2]
    plan.layer("head").weights, plan.layer("head").optim = places[2:]
    assert_same_training(engine_run(plan), reference())


def _random_plan(seed: int) -> OffloadPlan:
    rng = random.Random(seed)
    plan = block_plan([rng.choice(TRIPLES) for _ in range(4)])
    for name in ("embedding", "head"):
        layer = plan.layer(name)
        layer.weights, layer.optim = rng.choice(PLACES)
    plan.prefetch_depth = rng.choice((0, 1, 2))
    plan.weight_buffers = plan.prefetch_depth + rng.choice((2, 3))
    plan.overlap = rng.random() < 0.7
    return plan


@pytest.mark.parametrize("seed", range(4))
def test_random_per_layer_plans_train_like_plain_pytorch(seed):
    assert_same_training(engine_run(_random_plan(seed)), reference())


def test_without_overlap_and_without_prefetch():
    plan = OffloadPlan.prefix_suffix(4, 2, 2, 2, overlap=False, prefetch_depth=0, weight_buffers=2)
    assert_same_training(engine_run(plan), reference())


def test_no_clipping_updates_during_backward():
    # grad_clip <= 0: a host layer's update starts as soon as its last gradient lands.
    plan = OffloadPlan.prefix_suffix(4, 1, 2, 4)
    plan.layer("head").optim = "host"
    assert_same_training(engine_run(plan, clip=0.0), reference(clip=0.0))


def test_untied_llama_style_model():
    # Rotary positions (a model buffer), RMSNorm, SwiGLU, grouped-query attention, untied head.
    plan = OffloadPlan.prefix_suffix(4, 2, 3, 2)
    plan.layer("head").weights, plan.layer("embedding").optim = "host", "host"
    assert_same_training(engine_run(plan, cfg=LLAMA), reference(LLAMA))


def test_bf16_compute_with_fp32_masters_equals_the_hand_written_loop():
    """bf16 weights on the device, fp32 masters and Adam: the same as a loop that copies fp32
    masters into a bf16 model each step and accumulates its gradients in fp32."""
    torch.manual_seed(0)
    master = GPT(CFG)
    compute = GPT(CFG).to(torch.bfloat16)
    decay = [p for p in master.parameters() if p.dim() >= 2]
    rest = [p for p in master.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1.0, betas=(0.9, 0.95), fused=True)
    ref_losses = []
    for step in range(STEPS):
        with torch.no_grad():
            for c, m in zip(compute.parameters(), master.parameters()):
                c.copy_(m)
        loss_sum = 0.0
        for x, y in BATCHES[step]:
            loss = compute(x, y) / ACCUM
            loss.backward()
            loss_sum += loss.item()
            for c, m in zip(compute.parameters(), master.parameters()):
                m.grad = c.grad.float() if m.grad is None else m.grad + c.grad.float()
                c.grad = None
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(loss_sum)
    plan = OffloadPlan.prefix_suffix(4, 1, 2, 2)
    plan.layer("embedding").optim = "host"
    losses, state, engine, _ = engine_run(plan, dtype=torch.bfloat16)
    assert engine.layers[1].flat.param.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in state.values())
    assert_same_training((losses, state), (ref_losses, master.state_dict()))


# --- overlap ---------------------------------------------------------------------------------
def _slow_updates(engine, delay_s=0.01):
    """Make every CPU update slow, so the next step's forward really overlaps them."""
    submit = engine.worker.submit

    def slow_submit(priority, fn):
        if priority[1] == 1:  # an update, not a gradient accumulation
            def slow():
                time.sleep(delay_s)
                fn()
            return submit(priority, slow)
        return submit(priority, fn)

    engine.worker.submit = slow_submit


def test_forward_never_reads_a_weight_before_its_update_lands():
    plan = OffloadPlan.prefix_suffix(4, recompute=1, stream=2, cpu_optim=4)
    for name in ("embedding", "head"):
        plan.layer(name).optim = "host"
    plan.layer("embedding").weights = "host"
    result = engine_run(plan, trace=True, setup=_slow_updates)
    assert_same_training(result, reference())
    trace = result[2].trace
    overlapped = False
    for layer in plan.layers:
        updates = {e.args["step"]: e for e in trace if e.name == f"update {layer.name}"}
        first_fwd = {}
        for e in trace:
            if e.name == f"fwd {layer.name} mb0":
                first_fwd.setdefault(e.args["step"], e)
        assert sorted(updates) == list(range(STEPS))
        for step in range(1, STEPS):
            assert first_fwd[step].start_s >= updates[step - 1].end_s, (layer.name, step)
    head_updates = {e.args["step"]: e for e in trace if e.name == "update head"}
    for e in trace:
        if e.name == "fwd embedding mb0" and e.args["step"] >= 1:
            overlapped |= e.start_s < head_updates[e.args["step"] - 1].end_s
    assert overlapped, "the next step's forward never started before the previous step's last update ended"


def test_cpu_updates_are_served_lowest_layer_first():
    """Without clipping, updates are queued during backward from the head down; the worker
    serves the queue lowest layer first. A blocker task holds the worker from the first update
    of a step until all six are queued, so the queue's order alone decides (a FIFO would run
    the head first and the embedding last)."""
    plan = OffloadPlan.prefix_suffix(4, cpu_optim=4)
    plan.layer("embedding").optim = plan.layer("head").optim = "host"

    def hold_worker(engine):
        submit, queued, all_queued = engine.worker.submit, [], threading.Event()

        def holding_submit(priority, fn):
            if priority[1] == 1:  # an update
                queued.append(priority[0])
                if len(queued) % 6 == 1:
                    all_queued.clear()
                    submit((-1, 0), lambda: all_queued.wait(10))
                if len(queued) % 6 == 0:
                    all_queued.set()
            return submit(priority, fn)

        engine.worker.submit = holding_submit

    *_, engine, _ = engine_run(plan, clip=0.0, trace=True, steps=3, setup=hold_worker)
    for step in range(3):
        order = [e.name for e in sorted(engine.trace, key=lambda e: e.start_s)
                 if e.lane == "cpu_optim" and e.args["step"] == step]
        assert order == [f"update {layer.name}" for layer in plan.layers]


def test_worker_failure_surfaces_in_the_training_step():
    plan = OffloadPlan.prefix_suffix(4, cpu_optim=1)
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), plan, OPTIM, "cpu")
    engine.layers[4].host.optimizer.step = lambda: (_ for _ in ()).throw(ValueError("boom"))
    with pytest.raises(RuntimeError, match="CPU optimizer worker failed"):
        for step in range(3):
            engine.train_step(BATCHES[step], 1e-3, 1.0)
    engine.close()  # cleans up without raising the failure a second time
    assert not engine.worker._thread.is_alive()


# --- streaming -------------------------------------------------------------------------------
def test_head_weights_are_fetched_once_per_step():
    # The head's backward follows its forward, and nothing else streams: the buffer keeps the
    # head across micro-batches, and only a step's updates make it stale.
    plan = OffloadPlan.resident(4, weight_buffers=1, prefetch_depth=0)
    plan.layer("head").weights = "host"
    *_, engine, _ = engine_run(plan, steps=3)
    assert engine.streamer.copies == 3


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetch_fetches_the_next_blocks_before_they_run(depth):
    plan = OffloadPlan.prefix_suffix(4, stream=4, prefetch_depth=depth, weight_buffers=depth + 1)
    *_, engine, _ = engine_run(plan, trace=True, steps=1)
    events = [e for e in engine.trace if e.args["step"] == 0]
    first = {}
    for e in events:
        first.setdefault(e.name, e)
    ahead = [i for i in range(1, 4) if first[f"fetch block.{i}"].start_s < first["fwd block.0 mb0"].start_s]
    assert ahead == list(range(1, 1 + depth))


# --- device memory ---------------------------------------------------------------------------
def test_resident_plan_counts_what_the_memory_accountant_counts():
    _, _, engine, stats = engine_run(OffloadPlan.resident(4), steps=3)
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    acct = MemoryAccountant(model, opt)
    peaks = []
    for step in range(3):
        acct.reset_peak()
        for x, y in BATCHES[step]:
            with acct.track_activations():
                (model(x, y) / ACCUM).backward()
        opt.step()
        acct.after_optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        acct.grads_cleared()
        peaks.append(acct.peak_bytes)
    acct.close()
    # The accountant meets Adam state at the first step; the engine makes it up front.
    assert [s.peak_device_bytes for s in stats[1:]] == peaks[1:]


def _count_packs(packs: list):
    def setup(engine):
        pack = engine.ledger._pack
        engine.ledger._pack = lambda t: (packs.append(engine.step), pack(t))[1]
    return setup


@pytest.mark.parametrize("shape", [(0, 0, 0), (2, 0, 0), (0, 0, 2), (4, 2, 2)])
def test_counting_a_layer_at_a_time_bounds_the_per_tensor_count(shape):
    # After the first micro-batch of a shape, no saved-tensor hook runs unless weights are
    # streamed; the count by layer stays at or above the count by tensor, by less than a layer.
    plan = OffloadPlan.prefix_suffix(4, *shape)
    by_layer, exact = [], []
    _, _, engine, stats = engine_run(plan, steps=3, setup=_count_packs(by_layer))
    _, _, _, exact_stats = engine_run(plan, steps=3, setup=lambda e: (setattr(e.activations, "per_tensor", True),
                                                                     _count_packs(exact)(e)))
    assert len(engine.activations.by_shape) == 1  # one shape: measured once
    measured = next(iter(engine.activations.by_shape.values()))
    assert len(measured) == len(engine.layers) and sum(measured) > 0 and min(measured) >= 0
    if shape[1]:  # streamed weights: the hooks stay on for every micro-batch
        assert engine.activations.per_tensor and len(by_layer) == len(exact)
    else:
        assert set(by_layer) == {0} and len(by_layer) * 3 * ACCUM == len(exact)
    for s, e in zip(stats, exact_stats):
        assert e.peak_device_bytes <= s.peak_device_bytes <= e.peak_device_bytes + max(measured)


def test_a_new_batch_shape_is_measured_before_it_is_counted_by_layer():
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), OffloadPlan.prefix_suffix(4, recompute=2), OPTIM, "cpu")
    try:
        g = torch.Generator().manual_seed(0)
        peaks = {}
        for seq in (SEQ, SEQ // 2, SEQ, SEQ // 2):
            x, y = (torch.randint(0, 256, (MICRO, seq), generator=g) for _ in range(2))
            batch = [(x, y)]
            peaks.setdefault(seq, []).append(engine.train_step(batch, 1e-3, 1.0).peak_device_bytes)
        saved = {key[0]: sum(per_layer) for key, per_layer in engine.activations.by_shape.items()}
        assert len(engine.activations.by_shape) == 2 and set(saved) == {(MICRO, SEQ), (MICRO, SEQ // 2)}
        assert saved[(MICRO, SEQ // 2)] < saved[(MICRO, SEQ)]
        assert peaks[SEQ // 2][1] < peaks[SEQ][1]
        assert engine.ledger.bytes["activations"] == 0 and engine.ledger.bytes["grads"] == 0
    finally:
        engine.close()


def test_inputs_sharing_a_storage_are_measured_apart():
    # Autograd saves a tensor once however often it is saved: x is y saves less than x and y.
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), OffloadPlan.resident(4), OPTIM, "cpu")
    try:
        t = torch.randint(0, 256, (MICRO, SEQ))
        engine.train_step([(t, t)], 1e-3, 1.0)
        engine.train_step([(t, t.clone())], 1e-3, 1.0)
        (alias, shared), (apart, separate) = sorted(engine.activations.by_shape.items(), key=lambda kv: not kv[0][-1])
        assert alias[-1] and not apart[-1] and sum(shared) < sum(separate)
    finally:
        engine.close()


def test_offloading_lowers_the_peak_and_buffers_are_counted():
    resident = engine_run(OffloadPlan.resident(4), steps=2)
    offloaded = engine_run(OffloadPlan.prefix_suffix(4, 4, 4, 4, weight_buffers=2), steps=2)
    engine = offloaded[2]
    block_bytes = engine.layers[1].flat.nbytes
    assert engine.ledger.bytes["weight_buffers"] == 2 * block_bytes
    assert engine.ledger.bytes["optimizer"] < resident[2].ledger.bytes["optimizer"]
    assert offloaded[2].peak_device_bytes < 0.6 * resident[2].peak_device_bytes
    recompute_only = engine_run(OffloadPlan.prefix_suffix(4, recompute=4), steps=2)
    assert recompute_only[2].peak_device_bytes < resident[2].peak_device_bytes


def test_recompute_bytes_equal_what_a_kept_block_saves():
    _, _, engine, _ = engine_run(OffloadPlan.prefix_suffix(4, recompute=2), steps=1)
    torch.manual_seed(0)
    model = GPT(CFG)
    h = model.embed(BATCHES[0][0][0]).detach().requires_grad_()
    acct = MemoryAccountant(model)
    with acct.track_activations():
        out = model.blocks[0](h, model.rope())
    assert engine._act_bytes[(MICRO, SEQ)] == acct.act_bytes
    del out
    acct.close()


@pytest.mark.parametrize("shape", [(0, 0, 0), (2, 2, 2), (4, 4, 4)])
def test_budget_is_enforced_to_the_byte(shape):
    plan = OffloadPlan.prefix_suffix(4, *shape)
    peak = engine_run(plan, steps=2)[2].peak_device_bytes
    plan.device_budget_bytes = peak
    _, _, engine, stats = engine_run(plan, steps=2)
    assert max(s.peak_device_bytes for s in stats) <= peak and engine.peak_device_bytes <= peak
    plan.device_budget_bytes = peak - 1
    with pytest.raises(DeviceBudgetError, match="over the plan's device budget"):
        engine_run(plan, steps=2)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_before_allocation_predicts_the_ledger_exactly(seed, dtype):
    # apply_plan refuses a plan from arithmetic alone; that arithmetic must be what it then holds.
    for cfg in (CFG, LLAMA):
        engine = apply_plan(GPT(cfg), _random_plan(seed), OPTIM, "cpu", compute_dtype=dtype)
        assert engine.static_device_bytes == engine.ledger.current_bytes
        engine.close()


def test_budget_below_the_resident_state_fails_before_any_step():
    plan = OffloadPlan.resident(4, device_budget_bytes=100_000)
    model = GPT(CFG)
    with pytest.raises(DeviceBudgetError, match="before any activation"):
        apply_plan(model, plan, OPTIM, "cpu")
    assert len(list(model.parameters())) == 27 and "forward" not in model.blocks[0].__dict__  # untouched


def test_tied_head_reading_a_streamed_embedding_needs_two_buffers():
    plan = OffloadPlan.resident(4, weight_buffers=1, prefetch_depth=0)
    plan.layer("embedding").weights = plan.layer("head").weights = "host"
    with pytest.raises(ValueError, match="weight_buffers >= 2"):
        apply_plan(GPT(CFG), plan, OPTIM, "cpu")


def test_plan_for_another_model_or_dtype_is_refused():
    with pytest.raises(ValueError, match="the plan has 3 blocks but the model has 4"):
        apply_plan(GPT(CFG), OffloadPlan.resident(3), OPTIM, "cpu")
    with pytest.raises(ValueError, match="fp16 would need loss scaling"):
        apply_plan(GPT(CFG), OffloadPlan.resident(4), OPTIM, "cpu", compute_dtype=torch.float16)


# --- state, evaluation, clean-up -------------------------------------------------------------
def test_checkpoint_moves_between_plans_and_resumes_exactly(tmp_path):
    # Saved with torch.distributed.checkpoint under one plan, resumed under another.
    first = OffloadPlan.prefix_suffix(4, 1, 2, 3)
    second = OffloadPlan.prefix_suffix(4, 3, 1, 1)
    second.layer("head").optim = "host"
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), first, OPTIM, "cpu")
    for step in range(5):
        engine.train_step(BATCHES[step], lr_at(step), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(engine.state_dict(), checkpoint_id=str(tmp_path))
    engine.close()
    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    resumed = apply_plan(GPT(CFG), second, OPTIM, "cpu")
    state = resumed.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(tmp_path))
    resumed.load_state_dict(state)
    losses = [resumed.train_step(BATCHES[s], lr_at(s), 1.0).loss for s in range(5, STEPS)]
    final = {k: v.clone() for k, v in resumed.state_dict()["model"].items()}
    resumed.close()
    ref_losses, ref_state = reference()
    assert losses == pytest.approx(ref_losses[5:], rel=1e-6)
    for key, value in ref_state.items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_close_gives_back_a_plain_model_and_evaluate_matches_it():
    plan = OffloadPlan.prefix_suffix(4, 2, 2, 2)
    plan.layer("embedding").weights = "host"
    torch.manual_seed(0)
    model = GPT(CFG)
    names = [n for n, _ in model.named_parameters()]
    engine = apply_plan(model, plan, OPTIM, "cpu")
    for step in range(3):
        engine.train_step(BATCHES[step], lr_at(step), 1.0)
    x, y = BATCHES[0][0]
    engine_loss = engine.evaluate([(x, y)])
    state = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
    threads_before = threading.active_count()
    engine.close()
    assert threading.active_count() == threads_before - 1  # the worker is joined
    assert [n for n, _ in model.named_parameters()] == names
    assert model.lm_head.weight is model.tok_emb.weight
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert "forward" not in model.blocks[0].__dict__
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(engine_loss, rel=1e-6)
    loss = model(x, y)
    loss.backward()  # no engine hook is left on the parameters
    with pytest.raises(RuntimeError, match="closed"):
        engine.train_step(BATCHES[0], 1e-3, 1.0)
