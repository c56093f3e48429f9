"""Mixed precision (hetrain.precision): one bf16 copy of the weights per step, fp32 masters and gradients."""

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hetrain.model.gpt import GPT, ModelConfig
from hetrain.precision import WeightCopies, autocast

CPU = torch.device("cpu")
BF16 = torch.bfloat16
MICRO = 3


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=16,
                           pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (1, 12), generator=g), torch.randint(0, 64, (1, 12), generator=g))
            for _ in range(MICRO)]


def _loss_recomputing(model: GPT, x, y) -> torch.Tensor:
    """GPT.forward with the second block recomputed in the backward (torch's checkpoint)."""
    h, rope = model.embed(x), model.rope()
    h = model.blocks[0](h, rope)
    h = checkpoint(model.blocks[1], h, rope, use_reentrant=False)
    return model.head(h, y)


def _saved_weight_storages(fn, shapes: set) -> list[int]:
    """Storage of every bf16 tensor with a weight matrix's shape (or its transpose, as matmuls save
    it) that autograd saved while fn ran."""
    saved = []

    def pack(t):
        if t.dtype == BF16 and tuple(t.shape) in shapes:
            saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_one_copy_per_step_gives_the_gradients_of_a_cast_per_micro_batch_to_the_bit():
    """Gradient accumulation over 3 micro-batches with a block recomputed in the backward: the
    step's one copy gives exactly the fp32 gradients that casting the weights again in every
    micro-batch gives (plain forward, no recomputation), while autograd keeps one copy of each
    weight matrix for all micro-batches instead of one per micro-batch in flight."""
    shared, each = _gpt(), _gpt()
    copies = WeightCopies(shared, BF16)
    shapes = {s for p in shared.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    held = []

    def run_shared():
        for x, y in _batches():
            with copies.active(), autocast(CPU, BF16):
                loss = _loss_recomputing(shared, x, y) / MICRO
            held.append(copies.bytes)
            with copies.active():
                loss.backward()

    kept = []  # every micro-batch's casts stay alive, so that no two share an address

    def run_each():
        for x, y in _batches():
            casts = {n: p.to(BF16) for n, p in each.named_parameters()}
            kept.append(casts)
            with autocast(CPU, BF16):
                loss = functional_call(each, casts, (x, y)) / MICRO
            loss.backward()

    saved_shared = _saved_weight_storages(run_shared, shapes)
    saved_each = _saved_weight_storages(run_each, shapes)
    copies.release()
    for (name, a), b in zip(shared.named_parameters(), each.parameters()):
        assert a.dtype == a.grad.dtype == torch.float32, name
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    # bf16 tensors of a weight's shape that autograd saved: with the shared copy, as many storages
    # as the matrices the matmuls read (the tied one once; the recomputed block's are saved inside
    # its checkpoint, out of these hooks' sight), the same for every micro-batch.
    n_matrices = sum(1 for p in shared.parameters() if p.dim() == 2)
    recomputed = sum(1 for p in shared.blocks[1].parameters() if p.dim() == 2)
    assert len(saved_shared) == MICRO * (n_matrices - recomputed)
    assert len(set(saved_shared)) == n_matrices - recomputed
    assert len(set(saved_each)) == MICRO * n_matrices
    assert held == [2 * shared.num_params()] * MICRO  # one bf16 copy of every parameter, the tied matrix once
    assert copies.bytes == 0


def test_copies_follow_the_masters_after_release_and_nothing_changes_in_fp32():
    model = _gpt()
    copies = WeightCopies(model, BF16)
    x, y = _batches()[0]
    with torch.no_grad():
        with copies.active():
            assert model.blocks[0].attn.qkv.weight.dtype == BF16
            before = model(x, y)
        assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # the masters are back
        assert isinstance(model.blocks[0].attn.qkv.weight, torch.nn.Parameter)
        for p in model.parameters():
            p.mul_(0.5)  # an optimizer step
        with copies.active():
            stale = model(x, y)  # still the step's copies
        copies.release()
        with copies.active():
            fresh = model(x, y)
    assert stale == before and fresh != before
    plain = WeightCopies(model, None)
    with plain.active():
        assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert plain.bytes == 0


def test_held_weights_train_like_the_masters_they_came_from_whose_storage_is_freed():
    """ZeRO-1 in bf16 (ShardedUpdate.hold_masters): a replica holds bf16 weights of every parameter
    (one flat buffer per owner) cast from the masters and frees the fp32 storage of those another
    replica owns; the step's copies are the held weights, and three micro-batches (a block recomputed) give the losses and the fp32
    gradients of casting the masters, to the bit, the tied matrix included."""
    from hetrain.pipeline.data_parallel import ShardedUpdate

    sharded_model, plain_model = _gpt(), _gpt()
    params = list(sharded_model.parameters())
    others = params[1::2]  # what "the other replica" owns; the tied matrix (first) stays here
    update = ShardedUpdate(link=None, owned_by=[params[0::2], others], index=0)
    sharded, plain = WeightCopies(sharded_model, BF16), WeightCopies(plain_model, BF16)
    freed = update.hold_masters([sharded], BF16)
    assert freed == 4 * sum(p.numel() for p in others)
    assert all(p.untyped_storage().nbytes() == 0 for p in others)
    assert all(p.untyped_storage().nbytes() == 4 * p.numel() for p in params[0::2])
    assert sharded.held is update.held and set(update.held) == {id(p) for p in params}
    assert [f.numel() for f in update.flats] == [sum(p.numel() for p in params[0::2]), sum(p.numel() for p in others)]
    losses = {}
    for name, model, copies in (("sharded", sharded_model, sharded), ("plain", plain_model, plain)):
        losses[name] = []
        for x, y in _batches():
            with copies.active(), autocast(CPU, BF16):
                loss = _loss_recomputing(model, x, y) / MICRO
            with copies.active():
                loss.backward()
            losses[name].append(float(loss.detach()))
        copies.release()
    assert losses["sharded"] == losses["plain"]
    for (name, a), b in zip(sharded_model.named_parameters(), plain_model.parameters()):
        assert a.grad.dtype == torch.float32 and a.grad.shape == a.shape, name
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
