"""What a Config asks for, in the terms the floors below the trainer take.

The predictor, the profiler and the planners take a model (hetrain.model.spec.ModelSpec), a
batch shape, budgets and a cost model, never the Config; the trainer and the commands read the
Config once, here, and hand those down. This module translates; it must not price, plan or
train.
"""

from __future__ import annotations

import os

from hetrain.config import Config
from hetrain.model.describe import ModelDescription
from hetrain.model.spec import BatchShape, ModelSpec
from hetrain.predict.cost import CostModel, Profile, cost_model
from hetrain.predict.roofline import Efficiency


def model_spec(cfg: Config) -> ModelSpec:
    """hetrain's preset (model.*), or the transformers model at hf.path (ConfigError as hf.path's)."""
    return ModelSpec.hf_folder(cfg.hf.path) if cfg.hf.path else ModelSpec.gpt(cfg.model)


def batch_shape(cfg: Config) -> BatchShape:
    t = cfg.train
    return BatchShape(t.micro_batch, t.seq_len, t.dtype, t.grad_accum)


def describe(cfg: Config) -> ModelDescription:
    """The description of the model and micro-batch `cfg` trains (ConfigError for a model hetrain
    cannot describe)."""
    return model_spec(cfg).describe_batch(batch_shape(cfg))


def training_threads(cfg: Config) -> int:
    return cfg.run.threads or os.cpu_count() or 1


def job_cost(cfg: Config, profile: Profile | None = None, desc: ModelDescription | None = None,
             efficiency: Efficiency = Efficiency()) -> CostModel:
    """The cost model of `cfg`'s job (hetrain.predict.cost.cost_model): the catalog kind when
    hardware.device_kind names one, else `profile`, else this machine's catalog kind."""
    spec = model_spec(cfg)
    desc = desc or spec.describe_batch(batch_shape(cfg))
    return cost_model(spec, desc, cfg.train.dtype, kind_name=cfg.hardware.device_kind,
                      threads=training_threads(cfg), profile=profile, efficiency=efficiency)


def profile_job(cfg: Config, options=None):
    """Profile `cfg`'s model and batch on run.device with run.threads (hetrain.predict.profiler.run_profile)."""
    from hetrain.predict.profiler import run_profile
    from hetrain.train.distributed import pick_device

    return run_profile(model_spec(cfg), batch_shape(cfg), pick_device(cfg.run.device), training_threads(cfg),
                       cfg.hardware.profile_dir, options)


def predict_job(cfg: Config, profile: Profile | None = None):
    """The predicted plain step of `cfg`'s job (hetrain.predict.step_graph.predict_step), priced by
    job_cost. ConfigError when the profile has no entry for this model, sequence length and dtype,
    or for a transformers model hetrain cannot describe."""
    from hetrain.predict.step_graph import StepGraphOptions, predict_step

    desc = describe(cfg)
    return predict_step(desc, job_cost(cfg, profile, desc), StepGraphOptions(grad_accum=cfg.train.grad_accum))
