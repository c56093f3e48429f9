"""The engine's real allocations equal the shared byte rules (hetrain.predict.state_bytes)
for every placement of a layer's state: native parameters with device AdamW, a managed layer
with its master and AdamW on the device (weights resident or streamed), and a host layer
(CPU AdamW), in fp32 and bf16. The planner and `hetrain estimate` count with the same rules,
so what they predict is what the engine allocates."""

import pytest
import torch

from hetrain.model.gpt import GPT
from hetrain.offload import apply_plan
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.predict.state_bytes import adam_state_bytes, device_optimizer_bytes, host_layer_bytes
from test_engine import CFG, OPTIM


def optimizer_state_bytes(optimizer, tensors) -> int:
    return sum(t.nbytes for p in tensors for t in optimizer.state[p].values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_allocations_follow_the_byte_rules(dtype):
    plan = OffloadPlan.resident(4)
    # block.0: host AdamW; block.1: streamed weights, master and AdamW on the device; the rest
    # resident: native parameters in fp32, a device master beside a bf16 compute copy in bf16.
    plan.block(0).optim = "host"
    plan.block(1).weights = "host"
    engine = apply_plan(GPT(CFG), plan, OPTIM, "cpu", dtype)
    try:
        seen = set()
        for layer in engine.layers:
            tensors = len(layer.owned)
            if layer.host is not None:
                h = layer.host
                state = sum(t.nbytes for v in h.master_views for t in h.optimizer.state[v].values())
                real = h.master.nbytes + h.grad.nbytes + state
                real += 0 if h.upload is h.master else h.upload.nbytes
                real += 0 if h.staging is None else h.staging.nbytes
                assert real == host_layer_bytes(layer.flat.numel, tensors, dtype.itemsize, pinned=False), layer.name
                seen.add("host")
            elif layer.dev is not None:
                params = sum(v.numel() for v in layer.dev.views)  # the flat's padding has no AdamW state
                real = layer.dev.master.nbytes + optimizer_state_bytes(engine.device_optimizer, layer.dev.views)
                assert real == device_optimizer_bytes(layer.flat.numel, params, tensors), layer.name
                seen.add("device master")
            elif layer.native:
                owned = [p for _, p in layer.owned]
                params = sum(p.numel() for p in owned)
                assert optimizer_state_bytes(engine.device_optimizer, owned) == adam_state_bytes(params, tensors)
                assert sum(p.nbytes for p in owned) == 4 * params
                seen.add("native")
        assert seen == ({"host", "device master", "native"} if dtype == torch.float32 else {"host", "device master"})
    finally:
        engine.close()
