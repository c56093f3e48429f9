"""Single-node offloading: the engine that executes an OffloadPlan, and its techniques.

`apply_plan(model, plan, optim_cfg, device)` (engine.py) composes activation recomputation
(checkpointing.py), weight streaming (weights.py) and the CPU optimizer (cpu_optim.py) on a
GPT and returns the OffloadEngine whose `train_step` the trainer calls.
"""

from hetrain.offload.checkpointing import DeviceBudgetError, DeviceLedger, apply_recompute
from hetrain.offload.cpu_optim import OptimConfig
from hetrain.offload.engine import OffloadEngine, StepStats, apply_plan

__all__ = ["DeviceBudgetError", "DeviceLedger", "OffloadEngine", "OptimConfig", "StepStats", "apply_plan",
           "apply_recompute"]
