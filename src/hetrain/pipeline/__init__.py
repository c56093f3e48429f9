"""Runs cluster plans (`hetrain plan --cluster`) across processes on torch.distributed.

One file per technique, each applying itself to a plain model (hetrain's GPT, or a transformers
causal LM through the block interface) from outside: placement.py (where
each rank runs, from the plan's plain data), stages.py (stages cut from the model, with the
plan's recomputation), tensor_parallel.py (torch.distributed.tensor.parallel inside a stage),
schedule.py (torch.distributed.pipelining stages and schedules, traced), data_parallel.py
(gradients across replicas and pipelines), communicator.py (process groups and the route
between device kinds). Nothing here imports a planner, the trainer or the Config: the plan
arrives as data, and hetrain.train wires the runtime (cluster_launch.py, the entry `hetrain
train --plan.file` calls under torchrun; cluster_trainer.py, the loop that composes the
techniques in a documented order; cluster_checkpoint.py, torch.distributed.checkpoint in the
one-process format). Decisions and measurements: docs/pipeline.md.
"""
