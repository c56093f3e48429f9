"""Helpers shared by test modules (tests/ is on sys.path under pytest, so import by name)."""


def tiny_overrides(run_dir, corpus, **extra) -> dict[str, str]:
    """A tiny model on a small corpus: every trainer test runs in seconds on CPU."""
    values = {
        "run.dir": str(run_dir), "run.threads": "2", "model.preset": "tiny",
        "data.source": "text", "data.path": str(corpus), "data.cache_dir": "",
        "train.steps": "10", "train.micro_batch": "4", "train.seq_len": "32",
        "train.warmup_steps": "2", "train.eval_every": "5", "train.eval_batches": "2",
        "train.log_every": "1", "train.ckpt_every": "5", "log.progress": "false",
        "log.tensorboard": "false", "log.peak_flops": "1e11", "memory.device_budget": "none",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return values


def cli_args(run_dir, corpus, **extra) -> list[str]:
    """The same config as command-line overrides."""
    args = []
    for key, value in tiny_overrides(run_dir, corpus, **extra).items():
        args += [f"--{key}", value]
    return args


# Tiny transformers configs of every family hetrain's block interface and description cover:
# 2 blocks, hidden 64, 4 heads (2 key/value heads where the family has grouped-query
# attention), byte vocabulary. Built from config objects: nothing is downloaded.
HF_FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4)),
}


def tiny_hf_config(family: str, **overrides):
    """A transformers config of `family` (see HF_FAMILIES), with `overrides` applied."""
    import transformers

    cls, kwargs = HF_FAMILIES[family]
    defaults = {"vocab_size": 256} if family == "gpt2" else {"vocab_size": 256, "max_position_embeddings": 64}
    return getattr(transformers, cls)(**{**defaults, **kwargs, **overrides})


def save_tiny_hf(folder, family: str, **overrides):
    """A folder holding only config.json of a tiny `family` model (random init); returns it."""
    tiny_hf_config(family, **overrides).save_pretrained(folder)
    return folder


def textbook_training(model, batches, optim, lr_at, accum: int, clip: float = 1.0, dropout_seed: int | None = None):
    """The loop every offload plan is checked against: fused AdamW over two parameter groups
    (matrices decay), lr_at(step) each step, each step's micro-batches accumulated (loss / accum),
    clip_grad_norm_ (inf when clip <= 0). `dropout_seed` seeds the draws of the forward passes.
    Returns the per-step losses and the final state_dict."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=1.0, betas=(optim.beta1, optim.beta2),
                            fused=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    losses = []
    for step, micro_batches in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss_sum = 0.0
        for x, y in micro_batches:
            loss = model(x, y) / accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_match(got: dict, want: dict, rtol: float = 1e-6, atol: float = 1e-7,
                        outlier_atol: float = 1e-4, small_gradient: tuple[str, ...] = ()) -> None:
    """Parameters of a run that added the same gradients in another order (replicas, TP shards)
    against the reference: every element within rtol / atol, except at most 1 in 200 of each
    tensor (and at least 1) that may reach outlier_atol (lr / 30 at the tests' peak lr of 3e-3,
    where one AdamW step may move an element by up to lr either way: measured outliers reach
    2.3e-5).

    Reordering a sum changes fp32 rounding at the 1e-7 level; where a gradient element is nearly
    zero that noise is large relative to it, and AdamW (eps 1e-8) turns it into a visibly
    different update of that one element. How many depends on the CPU's kernels: TP 2 runs of
    the tests' 267k-parameter model left 11 such elements on an AMD EPYC and 54-59 on an Intel
    Xeon, up to 41 of them in one 16,384-element matrix (0.25%). Counting per tensor keeps a
    whole small tensor (a bias, a norm's weight) from going wrong unseen.

    `small_gradient`: name endings of small tensors whose whole gradient is tiny beside the others,
    so that any of their elements may be such a one; they are held to outlier_atol only. Qwen2's
    key bias moves the scores only through the rotary rotation (without it, q.b would be the same
    for every key of a query, which the softmax ignores): its gradient is about a thousandth of the
    value bias's, and a TP 2 run on an AMD EPYC left 3 of its 32 elements past the tight bound."""
    import torch

    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        torch.testing.assert_close(got[key], ref, rtol=rtol, atol=outlier_atol, msg=lambda m: f"{key}: {m}")
        if small_gradient and key.endswith(small_gradient):
            continue
        off = int(((got[key] - ref).abs() > atol + rtol * ref.abs()).sum())
        assert off <= max(1, ref.numel() // 200), f"{key}: {off} of {ref.numel()} elements differ by more than " \
                                                    f"{atol} + {rtol} x |reference|"


def reruns_of_last_matmul(block, run) -> int:
    """How often the block's last matmul module (its MLP down projection) runs again when the
    block's output from `run()` (under torch.utils.checkpoint, non-reentrant, early stop) is
    backpropagated: 0 when the early stop skips it."""
    from torch.utils.checkpoint import checkpoint

    last = [m for m in block.modules() if any(p.dim() == 2 for p in m.parameters(recurse=False))][-1]
    calls = []
    last.register_forward_hook(lambda *_: calls.append(1))
    out = checkpoint(run, use_reentrant=False)
    forward = len(calls)
    out.float().sum().backward()
    return len(calls) - forward

