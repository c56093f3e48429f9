"""The training loop: data, model, AdamW with warmup and cosine decay, clipping, logging, checkpoints.

Reads top to bottom like nanoGPT's train.py: set up (everything that can fail on bad input
fails here, before any file is written), then per step: learning rate, micro-batches with
gradient accumulation, clip, optimizer step, metrics, validation, checkpoint. Placement
decisions (checkpointing, offload) are not made here; they arrive as techniques applied to
the model before the loop starts.
"""

from __future__ import annotations

import contextlib
import statistics
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hetrain.config import Config, save_config, to_dict
from hetrain.data import Data, build_data
from hetrain.errors import ConfigError
from hetrain.files import check_output_dir
from hetrain.liveness import wait_s
from hetrain.memory import MemoryAccountant
from hetrain.precision import WeightCopies, autocast
from hetrain.trace import task_name
from hetrain.train import checkpoint as ckpt
from hetrain.train.plan_choice import choose_plan, unplannable
from hetrain.train.recipe import build_model, hf_tokenizer, lr_at, make_optimizer, train_flops_per_token
from hetrain.train.distributed import init_ranks, pick_device, processes_on_this_node
from hetrain.train.metrics import MetricsLogger, device_peak_flops, format_line
from hetrain.units import fmt_bytes
from hetrain.train.tracing import StepTracer


@dataclass
class Predicted:
    """A prediction to print beside the measurement (hetrain.predict's Prediction has these too)."""

    step_s: float
    peak_device_bytes: int
    source: str


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss, every step
    val_losses: dict[int, float] = field(default_factory=dict)
    step_times_s: list[float] = field(default_factory=list)  # every step of this process
    wall_s: float = 0.0
    checkpoint: Path | None = None


class Trainer:
    """Set up once (all validation first), then `fit()`."""

    def __init__(self, cfg: Config, data: Data | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        check_output_dir(self.run_dir, "run.dir")
        self.device = pick_device(cfg.run.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // processes_on_this_node()))
        self.ranks = init_ranks(self.device, cfg.run.dist_timeout_s)
        self.rank, self.world, self.is_main = self.ranks.rank, self.ranks.world, self.ranks.is_main

        # --- everything that can fail on user input, before any file is written ---------
        self.resume_path = ckpt.resolve_resume(self.run_dir, cfg.run.resume)
        self.resume_meta = ckpt.read_meta(self.resume_path) if self.resume_path is not None else None
        if self.resume_path is None and ckpt.list_checkpoints(self.run_dir):
            raise ConfigError(f"run dir '{self.run_dir}' already holds checkpoints; continue it with "
                              f"--run.resume auto, or start a new run with another --run.dir")
        if self.resume_meta is not None:
            self._check_compatible(self.resume_meta.config)
            if self.resume_meta.step > cfg.train.steps or (
                    self.resume_meta.step == cfg.train.steps and self._export_done()):
                raise ConfigError(f"checkpoint '{self.resume_path}' is at step {self.resume_meta.step} and "
                                  f"train.steps is {cfg.train.steps}: nothing to train; raise --train.steps above "
                                  f"{self.resume_meta.step} to continue the run")
        unplannable(cfg)  # a budget for a model no plan can drive fails here, before the data is read
        self.data = data if data is not None else build_data(cfg.data, cfg.run.seed, seq_len=cfg.train.seq_len,
                                                             tokenizer=hf_tokenizer(cfg))
        self.plan = choose_plan(cfg, self.ranks, self.resume_meta)
        torch.manual_seed(cfg.run.seed)
        self.engine = None
        if self.plan is None:
            self.model = build_model(cfg, self.data.vocab_size).to(self.device)
            self.n_params = self.model.num_params()
            self.optimizer = make_optimizer(self.model, cfg, self.device)
        else:
            # The engine places every tensor itself: the model starts as plain fp32 on the CPU.
            from hetrain.offload import OptimConfig, apply_plan

            self.model, self.optimizer = build_model(cfg, self.data.vocab_size), None
            if cfg.hf.path:
                self.model.check_stages()  # the engine runs it layer by layer
            self.n_params = self.model.num_params()  # counted before the engine takes the weights over
            t = cfg.train
            dp = None
            if self.world > 1:
                from hetrain.offload.sharded import DataParallel

                dp = DataParallel.create(timeout_s=wait_s(cfg.run.dist_timeout_s))
            try:
                self.engine = apply_plan(self.model, self.plan, OptimConfig(
                    t.weight_decay, t.beta1, t.beta2, cpu_threads=torch.get_num_threads()), self.device,
                    torch.bfloat16 if t.dtype == "bf16" else torch.float32, trace=cfg.log.trace, data_parallel=dp)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.step = 0
        if self.resume_path is not None:
            state = self._training_state()
            meta = ckpt.load_checkpoint(self.resume_path, state)
            if self.engine is not None:
                self.engine.load_state_dict(state)
            else:
                ckpt.apply_training_state(self.model, self.optimizer, state)
            self.data.train.load_state_dict(meta.data_state)
            self.step = meta.step
        self.run_peak_bytes = 0
        self._warned_mfu = False
        self.amp_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" and self.engine is None else None
        # bf16 without the engine: one bf16 copy of the weights per step, under autocast (hetrain.precision)
        self.weights = WeightCopies(self.model, self.amp_dtype)
        self.accountant = (MemoryAccountant(self.model, self.optimizer)
                           if self.device.type == "cpu" and self.engine is None else None)
        self.flops_per_token = train_flops_per_token(self.model, cfg)
        self.tracer = (StepTracer(self.model, self.model.blocks, self.device)
                       if cfg.log.trace and self.engine is None else None)
        self.prediction = self._predict()
        self.peak_flops, self.peak_source = device_peak_flops(
            self.device, self.amp_dtype or torch.float32, cfg.log.peak_flops)

    def _training_state(self) -> dict:
        if self.engine is not None:
            return self.engine.state_dict()
        return ckpt.training_state(self.model, self.optimizer)

    def _predict(self):
        """The predictor's step time and peak for this run, to print beside the measurement.

        From this machine's cached profile (`hetrain profile`); with --trace and no profile
        entry for this model, the model is profiled now (seconds for small models). On a GPU
        without a profile, from the catalog's figures for it. None where neither applies (a CPU
        run without a profile and without --trace, or a Hugging Face model hetrain cannot describe).
        """
        if self.plan is not None:
            if not self.plan.predicted_step_s:
                return None
            return Predicted(self.plan.predicted_step_s, self.plan.predicted_peak_device_bytes, "the offload plan")
        from hetrain.predict.profile_store import load_profile
        from hetrain.train.job import predict_job, profile_job

        profile = load_profile(self.cfg.hardware.profile_dir) if not self.cfg.hardware.device_kind else None
        guess_only = profile is None and not self.cfg.hardware.device_kind and self.device.type == "cpu"
        if not guess_only:  # a profile, a named catalog kind, or this GPU's catalog figures
            try:
                return predict_job(self.cfg, profile)
            except ConfigError:  # the profile has no entry for this model
                pass
        if not self.cfg.log.trace:
            return None  # the catalog's CPU placeholder is no prediction worth printing
        try:
            profile, _, _ = profile_job(self.cfg)
            return predict_job(self.cfg, profile)
        except ConfigError as e:  # a Hugging Face model hetrain cannot describe trains all the same
            print(f"hetrain: no prediction: {e}")
            return None

    def _export_done(self) -> bool:
        """model.safetensors was written after the checkpoint resumed from (a run that ended)."""
        export = self.run_dir / "model.safetensors"
        return export.is_file() and export.stat().st_mtime >= (self.resume_path / ckpt.META).stat().st_mtime

    def _check_compatible(self, saved: dict) -> None:
        """A resume must train the same model on the same data; other settings may change."""
        now = to_dict(self.cfg)
        for section in ("model", "data", "hf"):
            for key, value in saved.get(section, {}).items():
                if now[section].get(key) != value:
                    raise ConfigError(f"checkpoint '{self.resume_path}' was made with {section}.{key}={value!r}, "
                                      f"this run has {now[section].get(key)!r}; resume with the same --{section}.{key}")

    def _track(self):
        return self.accountant.track_activations() if self.accountant else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        self.model.eval()  # no dropout (the engine runs this model's modules too)
        try:
            if self.engine is not None:
                return self.engine.evaluate(batches)
            total = 0.0
            for x, y in batches:
                with self.weights.active(), autocast(self.device, self.amp_dtype):
                    total += self.model(x.to(self.device), y.to(self.device)).item()
            return total / len(batches)
        finally:
            self.weights.release()  # copies made without autograd
            self.model.train()

    def _peak_bytes(self) -> int:
        if self.engine is not None:
            return self.engine.peak_device_bytes
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self.accountant.peak_bytes

    def _reset_peak(self) -> None:
        self.run_peak_bytes = max(self.run_peak_bytes, self._peak_bytes())
        if self.engine is not None:
            return  # the engine's peak is since it was made (its ledger checks the budget per step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.accountant.reset_peak()

    def save(self, data_state: dict) -> Path:
        meta = ckpt.CheckpointMeta(step=self.step, data_state=data_state, config=to_dict(self.cfg),
                                   plan=self.plan.to_dict() if self.plan is not None else None,
                                   saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        state = self._training_state()  # under data parallelism, gathered on every rank
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(self.run_dir, state, meta, keep=self.cfg.train.keep_checkpoints)
        self.ranks.barrier()
        return path or ckpt.list_checkpoints(self.run_dir)[-1]

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.step == t.steps and self.resume_path is not None:
            return self._finish_export()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
            # The plan that runs, beside the config: `--plan.file RUN/plan.json` runs it again.
            if self.plan is not None:
                self.plan.save(self.run_dir / "plan.json")
            else:
                (self.run_dir / "plan.json").unlink(missing_ok=True)
        self.ranks.barrier()
        logger = MetricsLogger(self.run_dir, cfg.log.tensorboard, resume_step=self.step) if self.is_main else None
        val_batches = self.data.val_batches(t.micro_batch, t.seq_len, t.eval_batches) if t.eval_every else []
        tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum * self.world
        result = TrainResult(self.run_dir, self.step)
        print(f"hetrain: {self.data.describe()}")
        print(f"hetrain: model {self._model_name()} with {self.n_params / 1e6:.2f}M parameters on "
              f"{self.device} ({t.dtype}); {tokens_per_step:,} tokens/step; "
              f"peak {self.peak_flops / 1e12:.3g} TFLOP/s {self.peak_source}")
        if self.prediction is not None:
            print(f"hetrain: predicted step {1000 * self.prediction.step_s:.1f} ms, peak "
                  f"{fmt_bytes(self.prediction.peak_device_bytes)} (from {self.prediction.source})")
        if self.step:
            print(f"hetrain: resumed from {self.resume_path} at step {self.step}")

        if self.world > 1:
            print(f"hetrain: data parallel over {self.world} ranks; host optimizer state sharded {self.world} ways")
        bar = tqdm(total=t.steps, initial=self.step, disable=not (cfg.log.progress and self.is_main), unit="step",
                   dynamic_ncols=True)
        start = time.perf_counter()
        window_s, window_steps = 0.0, 0
        data_state = self.data.train.state_dict()
        saved_at = self.step if self.resume_path else -1
        self._reset_peak()
        try:
            while self.step < t.steps:
                lr = lr_at(self.step, cfg)
                tr = self._tracer_for(self.step + 1)
                step_start = time.perf_counter()
                if self.engine is not None:
                    # Every rank reads the same stream and takes its own slice of the global batch.
                    batches = [self.data.train.next_batch(t.micro_batch, t.seq_len)
                               for _ in range(t.grad_accum * self.world)]
                    stats = self.engine.train_step(batches[self.rank::self.world], lr, t.grad_clip)
                    self.step += 1
                    loss_sum, grad_norm = self.ranks.mean(stats.loss), stats.grad_norm
                else:
                    loss_sum, grad_norm = self._plain_step(tr, lr)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                data_state = self.data.train.state_dict()
                step_s = time.perf_counter() - step_start
                window_s, window_steps = window_s + step_s, window_steps + 1
                result.losses[self.step] = loss_sum
                result.step_times_s.append(step_s)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}")

                last = self.step == t.steps
                val_loss = None
                if t.eval_every and (self.step % t.eval_every == 0 or last):
                    val_loss = self.evaluate(val_batches)
                    result.val_losses[self.step] = val_loss
                if self.step % t.log_every == 0 or last or val_loss is not None:
                    mean_step_s = window_s / window_steps
                    tokens_per_s = tokens_per_step / mean_step_s
                    record = {
                        "step": self.step, "loss": loss_sum, "val_loss": val_loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                        "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                        "step_s": mean_step_s, "peak_device_bytes": self._peak_bytes(),
                        "elapsed_s": time.perf_counter() - start,
                    }
                    if self.prediction is not None:
                        record["predicted_step_s"] = self.prediction.step_s
                        record["predicted_peak_device_bytes"] = self.prediction.peak_device_bytes
                    if logger is not None:
                        logger.log(record)
                    bar.write(format_line(record))
                    if record["mfu"] > 1 and not self._warned_mfu:
                        self._warned_mfu = True
                        bar.write(f"hetrain: MFU above 100% means the peak ({self.peak_source}) understates this "
                                  f"device, e.g. measured while other work held the cores; declare it with "
                                  f"--log.peak_flops")
                    window_s, window_steps = 0.0, 0
                    self._reset_peak()
                if last or (t.ckpt_every and self.step % t.ckpt_every == 0):
                    result.checkpoint = self.save(data_state)
                    saved_at = self.step
        except KeyboardInterrupt:
            # Between steps the state is consistent: save it so the interruption loses nothing.
            bar.close()
            if self.step > saved_at and self.world == 1:  # ranks stop at different points: no collective save
                try:
                    path = self.save(data_state)
                    print(f"\nhetrain: interrupted; saved {path}; continue with --run.resume auto")
                except RuntimeError as e:  # an engine stopped mid-step holds no consistent state
                    print(f"\nhetrain: interrupted mid-step ({e}); the last checkpoint stands")
            if logger is not None:
                logger.close()
            raise
        except RuntimeError as e:
            if self.world == 1:
                raise
            bar.close()
            if logger is not None:
                logger.close()
            found = ckpt.list_checkpoints(self.run_dir)
            hint = f"; resume from {found[-1]} with --run.resume auto" if found else ""
            raise self.ranks.lost(e, hint) from e
        bar.close()
        if logger is not None:
            logger.close()
        self._reset_peak()
        if self.cfg.log.trace and self.is_main:
            self._write_trace()
        result.step = self.step
        result.wall_s = time.perf_counter() - start
        if self.engine is not None:
            self.engine.close()  # the model is plain fp32 on the CPU again, holding the trained values
        if self.step > 0 and saved_at == self.step and self.is_main:
            self._export()
        summary = f"hetrain: done: step {self.step} in {result.wall_s:.1f} s"
        if result.val_losses:
            summary += f"; val loss {next(iter(result.val_losses.values())):.3f} -> {list(result.val_losses.values())[-1]:.3f}"
        print(summary + f"; peak memory {fmt_bytes(self.run_peak_bytes)}; run dir {self.run_dir}")
        if self.prediction is not None and result.step_times_s:
            measured = statistics.median(result.step_times_s[1:] or result.step_times_s)  # skip warm-up
            print(f"hetrain: predicted vs measured: step {1000 * self.prediction.step_s:.1f} ms vs "
                  f"{1000 * measured:.1f} ms median (x{measured / self.prediction.step_s:.2f}); peak "
                  f"{fmt_bytes(self.prediction.peak_device_bytes)} vs {fmt_bytes(self.run_peak_bytes)} "
                  f"(x{self.run_peak_bytes / self.prediction.peak_device_bytes:.2f})")
        if self.accountant:
            self.accountant.close()
        self.ranks.close()
        return result

    def _finish_export(self) -> TrainResult:
        """A run stopped after its last checkpoint, before its export: write model.safetensors
        from that checkpoint, and nothing else."""
        if self.engine is not None:
            self.engine.close()  # the model holds the checkpoint's values as plain fp32 tensors
        if self.is_main:
            self._export()
        print(f"hetrain: the run ended at step {self.step} before its export; wrote "
              f"{self.run_dir / 'model.safetensors'} from {self.resume_path}")
        return TrainResult(self.run_dir, self.step, checkpoint=self.resume_path)

    def _export(self) -> None:
        path = ckpt.export_model(self.model, self.run_dir, hf_source=self.cfg.hf.path)
        if self.cfg.hf.path:
            print(f"hetrain: wrote {path} (transformers' from_pretrained loads it)")

    def _plain_step(self, tr, lr: float) -> tuple[float, float]:
        """Forward and backward over the micro-batches, clip, update: the textbook step."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.amp_dtype is not None:  # the step's bf16 copy of the weights (hetrain.precision)
            tr.begin(task_name("cast"), "cast")
            self.weights.make()
            tr.end(task_name("cast"))
        try:
            loss_sum = 0.0
            for m in range(t.grad_accum):
                tr.micro = m
                tr.begin(task_name("data", "", m), "data", "data")
                x, y = self.data.train.next_batch(t.micro_batch, t.seq_len)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                tr.end(task_name("data", "", m))
                with self._track(), self.weights.active():
                    with autocast(self.device, self.amp_dtype):
                        loss = self.model(x, y) / t.grad_accum
                    tr.begin(task_name("bwd", "head", m), "bwd")
                    loss.backward()
                    tr.end(task_name("bwd", "embedding", m))
                loss_sum += loss.item()
        finally:
            self.weights.release()  # before the update changes the masters
        tr.begin(task_name("optim"), "optim")
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.optimizer.step()
        self.step += 1  # the model now holds this step's update
        tr.end(task_name("optim"))
        if self.accountant:
            self.accountant.after_optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if self.accountant:
            self.accountant.grads_cleared()
        return loss_sum, grad_norm

    def _tracer_for(self, step: int):
        """The tracer, switched on for the traced steps (2 .. 1 + log.trace_steps), or a no-op."""
        if self.tracer is None:
            return _NO_TRACE
        self.tracer.active = 2 <= step <= 1 + self.cfg.log.trace_steps
        self.tracer.step = step
        return self.tracer

    def _write_trace(self) -> None:
        """trace.json and the timeline of the traced steps, and the slowest tasks beside their
        predictions (train/tracing.py)."""
        from hetrain.train.tracing import format_pairs, predicted_events, write_run_trace

        if self.engine is not None:  # the engine's own lanes: compute, h2d, d2h, cpu_optim
            last = self.cfg.log.trace_steps
            events = [e for e in self.engine.trace if 1 <= e.args.get("step", -1) <= last]
        else:
            events = self.tracer.events()
            self.tracer.close()
        if not events:
            print("hetrain: --trace recorded nothing (the run ended before its second step)")
            return
        pairs = write_run_trace(self.run_dir, events, predicted_events(self.cfg, self.plan),
                                f"measured steps ({self.device}{', offload plan' if self.plan else ''})")
        print(f"hetrain: trace of {len({e.args['step'] for e in events})} steps in {self.run_dir / 'trace.json'} "
              f"and trace_timeline.png; predicted beside measured, slowest first:")
        print(format_pairs(pairs))

    def _model_name(self) -> str:
        return f"hf:{self.cfg.hf.path}" if self.cfg.hf.path else self.cfg.model.preset


class _NoTrace:
    micro = 0

    def begin(self, name: str, cat: str, lane: str = "compute") -> None:
        pass

    def end(self, name: str) -> None:
        pass


_NO_TRACE = _NoTrace()


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).fit()
