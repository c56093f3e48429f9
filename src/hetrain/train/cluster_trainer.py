"""The training loop of one rank of a cluster plan: what hetrain.train.trainer does for one process.

`ClusterTrainer` sets up (every input check first, then the process groups), and `fit()` runs
the steps (the runtime is hetrain.pipeline; this module wires it). Setting up composes the techniques on a plain model (hetrain's GPT, or a
transformers causal LM from --hf.path; TP splits Llama-style layers) in this order, and why:
1. every rank builds the whole model from the seed (or loads it from the folder) on the CPU, as
   one process would, so each stage starts from exactly the one-process weights; it keeps its
   chunks (stages.py);
2. tensor parallelism shards the chunks' blocks (tensor_parallel.py) before anything holds
   references to their parameters; its backward all-reduces recompute COLLECTIVE units through
   the recomputation ledger of step 3;
3. recomputation wraps the plan's blocks, whole or unit by unit (torch.utils.checkpoint,
   hetrain.pipeline.unit_recompute), around the sharded layers;
4. the optimizer (fused AdamW, as one process) over the chunks' parameters;
5. the schedule (schedule.py) on the pipeline lane, and the gradient sync (data_parallel.py).

A step: learning rate; the global batch read as global_batch / read_unit reads of read_unit
sequences (what one process with --train.micro_batch read_unit --train.grad_accum that many
reads), this replica's slice of it; the schedule's forward and backward; gradient sync; one
all-reduce of (loss, squared norm) over all ranks; clipping as torch.nn.utils.clip_grad_norm_;
the optimizer step. Rank 0 logs (metrics.jsonl with predicted_step_s), evaluates, and all ranks
write checkpoints together (cluster_checkpoint.py). At the end rank 0 prints the plan's predicted step
and per-stage times beside the measured ones and writes trace.json (every rank's stages and
links). When a collective or a pipeline receive fails or times out (run.dist_timeout_s), each rank
names the ranks that stop answering (communicator.wait_for_ranks) and exits at once.
This module runs the loop; the techniques live in their own files.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from hetrain.config import Config, save_config, to_dict
from hetrain.data import build_data
from hetrain.errors import ConfigError
from hetrain.train import cluster_checkpoint as pckpt
from hetrain.liveness import roll_call, roll_call_s
from hetrain.pipeline.communicator import NATIVE, Communicator, local_rank
from hetrain.pipeline.data_parallel import GradientSync, OverlappedReduce, ShardedUpdate
from hetrain.pipeline.placement import Layout
from hetrain.pipeline.schedule import StageClock, build_schedule
from hetrain.pipeline.stages import apply_stage_recompute, build_chunk, model_names
from hetrain.model.hf import load_hf_config
from hetrain.pipeline.tensor_parallel import apply_tensor_parallel, check_hf_tp, check_tp
from hetrain.pipeline.unit_recompute import Recomputations
from hetrain.plan.cluster.plan import ClusterPlan
from hetrain.train import checkpoint as ckpt
from hetrain.train.metrics import MetricsLogger, format_line
from hetrain.train.recipe import build_model, lr_at, make_optimizer, train_flops_per_token
from hetrain.train.trainer import TrainResult


def overlaps_grad_reduce(plan: ClusterPlan) -> bool:
    """Whether the plan was priced with the replicas' gradient reduction inside the backward
    (plan.options; a plan from before the option existed takes the planner's default)."""
    from hetrain.plan.cluster.cost import PredictorOptions

    return bool((plan.options or {}).get("overlap_grad_reduce", PredictorOptions.overlap_grad_reduce))


class ClusterTrainer:
    """One rank of a cluster plan. Set up once (all validation first), then `fit()`."""

    def __init__(self, cfg: Config, plan: ClusterPlan, layout: Layout, rank: int):
        self.cfg, self.plan, self.layout = cfg, plan, layout
        self.place = place = layout.places[rank]
        self.run_dir = Path(cfg.run.dir)
        self.is_main = rank == 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.run.threads or max(1, (os.cpu_count() or 1) // local_world))
        if place.device_type == "cuda":
            self.device = torch.device("cuda", local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device(place.device_type)

        # --- everything that can fail on user input, before any group or file exists -------
        if cfg.hf.path:
            why = check_hf_tp(load_hf_config(cfg.hf.path), place.tp) if place.tp > 1 else None
        else:
            why = check_tp(cfg.model, place.tp)
        if why is None and place.tp > 1 and not cfg.hf.path and cfg.model.attn_dropout > 0:
            # Residual dropout is fine: every TP rank seeds alike and draws the same masks for the
            # replicated activations (after the all-reduces), those of one process when the run
            # has one stage and one replica; attention dropout is not.
            why = (f"model.dropout={cfg.model.dropout} on the attention probabilities with tensor parallelism: each "
                   f"rank would draw its own masks for its heads, so the run would not train the one-process "
                   f"model (--model.dropout_attention false keeps dropout on the residual branches only)")
        if why:
            raise ConfigError(f"plan pipeline {place.pipeline}: {why}; re-plan with another --plan.tp")
        self.resume_path = ckpt.resolve_resume(self.run_dir, cfg.run.resume)
        if self.resume_path is None and ckpt.list_checkpoints(self.run_dir):
            raise ConfigError(f"run dir '{self.run_dir}' already holds checkpoints; continue it with "
                              f"--run.resume auto, or start a new run with another --run.dir")
        meta = ckpt.read_meta(self.resume_path) if self.resume_path else None
        if meta is not None:
            _check_compatible(cfg, meta.config, self.resume_path)
        self.data = build_data(cfg.data, cfg.run.seed, seq_len=cfg.train.seq_len)
        if not cfg.hf.path and self.data.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"the data has {self.data.vocab_size} token ids but the plan's model has a vocabulary of "
                              f"{cfg.model.vocab_size}; re-plan with --model.vocab_size {self.data.vocab_size}")

        # --- process groups, then the model, as the module docstring orders it ---------------
        self.comm = Communicator.create(layout, rank, self.device, cfg.run.dist_timeout_s)
        torch.manual_seed(cfg.run.seed)
        whole = build_model(cfg, self.data.vocab_size)
        self.n_params = whole.num_params()
        self.flops_per_token = train_flops_per_token(whole, cfg)
        self.names = model_names(whole, cfg.train.seq_len)
        autocast_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else None
        self.chunks = [build_chunk(whole, c, place.micro_batch, cfg.train.seq_len, autocast_dtype).to(self.device)
                       for c in place.chunks]
        del whole
        self.ledger = Recomputations(cfg.run.recompute_full_rerun)
        if place.tp > 1:  # each block's backward all-reduces recompute the previous block's COLLECTIVE units
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(self.comm.tp.group, place.device_type)
            for chunk in self.chunks:
                apply_tensor_parallel(chunk, mesh, cfg.model, cfg.run.emulate_tp_link_gbytes_per_s,
                                      window=lambda c, at, side, f: self.ledger.collective(c, at, side, f, f.ended_s))
        self.recompute = [apply_stage_recompute(chunk, self.ledger) for chunk in self.chunks]
        self.named = [(n, p) for chunk in self.chunks for n, p in chunk.named_parameters(remove_duplicate=False)]
        share = layout.pipeline_samples[place.pipeline] / layout.global_batch
        self.sync = GradientSync(self.comm, self.named, self.names, cfg.model, share)
        # ZeRO-1 when the plan was priced with it: this replica updates (and holds moments for) its share.
        self.sharded = ShardedUpdate.build(self.sync) if (plan.options or {}).get("distributed_optimizer") else None
        if self.sharded is not None and not self.comm.exchange and self.comm.dp.route == NATIVE:
            # One pipeline: each gradient is reduced to its owner (the tied matrix, summed over its
            # tie group too, stays all-reduced).
            tied = {id(p) for n, p in self.named if self.names.tied and n in self.names.tied}
            self.sync.owner_of = self.sharded.owner_ranks(skip=tied)
        self.optimizer = _optimizer(self.chunks, cfg, self.device,
                                    owned=self.sharded.owned if self.sharded is not None else None)
        self.clock = StageClock(sync_cuda=self.device.type == "cuda")
        self.run = build_schedule(self.chunks, self.comm, (self.names.hidden_size, self.names.vocab_size),
                                  cfg.train.seq_len, self.clock, self.ledger, cfg.run.emulate_link_gbytes_per_s,
                                  autocast_dtype)
        if overlaps_grad_reduce(plan):  # as the planner priced it: each block's reduction inside the backward
            chunk_named = {c.index: list(chunk.named_parameters(remove_duplicate=False))
                           for chunk, c in zip(self.chunks, place.chunks)}
            self.sync.overlapped = OverlappedReduce.build(self.sync, chunk_named, place.n_microbatches,
                                                          on_cpu=cfg.run.cpu_overlap_grad_reduce)
            if self.sync.overlapped is not None:
                self.run.overlap.on_last_backward = self.sync.overlapped.arm
                for stage in self.run.stages:  # it divides what it reduces itself
                    stage.scaled_elsewhere = self.sync.overlapped.scaled
        self.step = 0
        self.rng_restored = False
        if self.resume_path is not None:
            pckpt.load(self.resume_path, self.named, self.optimizer, self.names, cfg.model, place.tp)
            self.data.train.load_state_dict(meta.data_state)
            self.step = meta.step
            self.rng_restored = pckpt.load_rng(self.resume_path, place)
        self.masters_freed_bytes = 0
        if self.sharded is not None and autocast_dtype is not None:  # the weights are final: shard the masters too
            self.masters_freed_bytes = self.sharded.hold_masters(self.run.weights, autocast_dtype)
        self.start_step = self.step
        self.predicted_step_s = float(plan.prediction.get("step_s") or 0.0)
        self.peak_flops = _cluster_peak_flops(cfg, plan, layout)

    # --- one step ----------------------------------------------------------------------------

    def _global_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's slice of the step's global batch (every rank reads the same stream)."""
        unit, t = self.layout.read_unit, self.cfg.train
        reads = [self.data.train.next_batch(unit, t.seq_len) for _ in range(self.layout.global_batch // unit)]
        x, y = torch.cat([r[0] for r in reads]), torch.cat([r[1] for r in reads])
        start = self.place.sample_start
        return x[start:start + self.place.samples], y[start:start + self.place.samples]

    def _train_step(self, lr: float) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self._global_batch()
        losses = self.run.step(x, y)
        self.sync.reduce()
        loss_part = 0.0
        if losses and self.place.tp_rank == 0:  # this replica's mean loss, weighted by its share
            mean = float(torch.stack([v.detach().float() for v in losses]).mean())
            loss_part = mean * self.sync.share / self.place.dp
        loss, sq_norm = self.comm.sum_scalars([loss_part, self.sync.local_sq_norm()])
        grad_norm = math.sqrt(sq_norm)
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in self.sync.unique())]
        if self.cfg.train.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_'s rule, on the global norm
            norm = torch.tensor(grad_norm, dtype=torch.float32)
            coef = torch.clamp(self.cfg.train.grad_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        self.optimizer.step()
        if self.sharded is not None:
            self.sharded.broadcast()
        for p in self.sync.unique():  # every parameter's, not only the optimizer's (ZeRO-1 updates a share)
            p.grad = None
        self.step += 1
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss on the sequences one process would use (replica 0 of pipeline 0 runs it, in
        whole rounds of its schedule; the same value when its micro-batch divides them)."""
        t, unit = self.cfg.train, self.layout.read_unit
        part = 0.0
        if self.place.pipeline == 0 and self.place.replica == 0:
            batches = self.data.val_batches(unit, t.seq_len, t.eval_batches)
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            size = self.place.samples
            rounds = max(1, math.ceil(len(x) / size))
            idx = torch.arange(rounds * size) % len(x)  # whole rounds of the schedule's shape
            values = []
            for r in range(rounds):
                sel = idx[r * size:(r + 1) * size]
                values += self.run.evaluate(x[sel], y[sel])
            if len(x) % self.place.micro_batch == 0:  # the micro-batches of exactly those sequences
                values = values[:len(x) // self.place.micro_batch]
            if values and self.place.tp_rank == 0:
                part = float(torch.stack([v.float() for v in values]).mean())
        return self.comm.sum_scalars([part])[0]

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.toml")
        dist.barrier(group=self.comm.control)
        self.clock.origin_s = self.comm.sum_scalars([time.time() if self.is_main else 0.0])[0]
        logger = MetricsLogger(self.run_dir, cfg.log.tensorboard, resume_step=self.step) if self.is_main else None
        tokens_per_step = self.layout.global_batch * t.seq_len
        result = TrainResult(self.run_dir, self.step)
        self._announce(tokens_per_step)
        start = time.perf_counter()
        window_s, window_steps, saved_at = 0.0, 0, self.step if self.resume_path else -1
        data_state = self.data.train.state_dict()
        try:
            while self.step < t.steps:
                lr = lr_at(self.step, cfg)
                self.clock.step = self.step + 1
                self.clock.record = 2 <= self.step + 1 <= 1 + cfg.log.trace_steps
                step_start = time.perf_counter()
                loss, grad_norm = self._train_step(lr)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_s = time.perf_counter() - step_start
                data_state = self.data.train.state_dict()
                window_s, window_steps = window_s + step_s, window_steps + 1
                result.losses[self.step] = loss
                result.step_times_s.append(step_s)
                last = self.step == t.steps
                val_loss = None
                if t.eval_every and (self.step % t.eval_every == 0 or last):
                    val_loss = self.evaluate()
                    result.val_losses[self.step] = val_loss
                if self.step % t.log_every == 0 or last or val_loss is not None:
                    mean_step_s = window_s / window_steps
                    record = {"step": self.step, "loss": loss, "val_loss": val_loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_step / mean_step_s,
                              "mfu": tokens_per_step / mean_step_s * self.flops_per_token / self.peak_flops,
                              "step_s": mean_step_s, "peak_device_bytes": self._peak_bytes(),
                              "elapsed_s": time.perf_counter() - start}
                    if self.predicted_step_s:
                        record["predicted_step_s"] = self.predicted_step_s
                    if logger is not None:
                        logger.log(record)
                        line = format_line(record)  # a CPU rank has no device memory to report
                        print(line if self.device.type == "cuda" else line.replace(" | peak 0 B", ""), flush=True)
                    window_s, window_steps = 0.0, 0
                if last or (t.ckpt_every and self.step % t.ckpt_every == 0):
                    result.checkpoint = self._save(data_state)
                    saved_at = self.step
        except Exception as e:  # noqa: BLE001 - a rank that lost its peers reports and leaves
            self._fail(e, saved_at)
        if logger is not None:
            logger.close()
        result.step, result.wall_s = self.step, time.perf_counter() - start
        self._report(result)
        if self.is_main and result.checkpoint is not None and saved_at == self.step:
            torch.manual_seed(cfg.run.seed)  # the weights are all overwritten; a transformers build draws
            model = pckpt.load_whole_model(result.checkpoint, build_model(cfg, self.data.vocab_size))
            path = ckpt.export_model(model, self.run_dir, hf_source=cfg.hf.path)
            if cfg.hf.path:
                print(f"hetrain: wrote {path} (transformers' from_pretrained loads it)", flush=True)
        overlapped = self.sync.overlapped
        if self.is_main and overlapped is not None:
            how = "reduced to their owners" if overlapped.owner_of else "all-reduced"
            print(f"hetrain: gradient reduction across replicas: {overlapped.last_step_buckets} of "
                  f"{overlapped.n_buckets} buckets {how} inside the backward in the last step (rank 0)", flush=True)
        if overlapped is not None:
            overlapped.close()
        if self.is_main:
            print(f"hetrain: done: step {self.step} in {result.wall_s:.1f} s; run dir {self.run_dir}", flush=True)
        for handle in self.recompute:
            handle.remove()
        self.run.close()
        dist.barrier(group=self.comm.control)
        dist.destroy_process_group()
        return result

    def _peak_bytes(self) -> int:
        """Rank 0's device memory peak since the last report (0 on a CPU)."""
        if self.device.type != "cuda":
            return 0
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _announce(self, tokens_per_step: int) -> None:
        if not self.is_main:
            return
        p = self.plan
        shapes = "; ".join(f"P{i}: {' -> '.join(pp.groups)}, {len(pp.stages) // pp.virtual_stages} stages"
                           f"{f' x {pp.virtual_stages} virtual' if pp.virtual_stages > 1 else ''}, dp {pp.dp}, "
                           f"tp {pp.stages[0].tp}, {pp.n_microbatches} x {pp.micro_batch}"
                           for i, pp in enumerate(p.pipelines))
        print(f"hetrain: {self.data.describe()}")
        print(f"hetrain: cluster plan over {self.layout.world} processes: {shapes}; schedule {self.run.name}; "
              f"{self.n_params / 1e6:.2f}M parameters; {tokens_per_step:,} tokens/step", flush=True)
        print(f"hetrain: links: {self.comm.lane.route} pipeline lane; same as one process with "
              f"--train.micro_batch {self.layout.read_unit} --train.grad_accum "
              f"{self.layout.global_batch // self.layout.read_unit}", flush=True)
        print(f"hetrain: compute: {_describe_dtypes(self.cfg, self.plan)}", flush=True)
        if self.sharded is not None:
            mine = sum(p.numel() for p in self.sharded.owned)
            every = sum(p.numel() for p in self.sync.unique())
            masters = (f"; it keeps the fp32 masters of those only and bf16 weights of the rest, which the owners "
                       f"broadcast after each step ({self.masters_freed_bytes:,} bytes of fp32 weights freed)"
                       if self.sharded.held_dtype is not None else "")
            reduced = ("; gradients are reduced to the replica that updates them" if self.sync.owner_of else
                       "; gradients are all-reduced")
            print(f"hetrain: AdamW state sharded over {len(self.sharded.owned_by)} replicas (ZeRO-1): this rank "
                  f"updates {mine:,} of its {every:,} parameters{masters}{reduced}", flush=True)
        if self.place.tp > 1:
            mine = self.sync.unique()  # a tied matrix once
            local = sum((q.to_local() if isinstance(q, DTensor) else q).numel() for q in mine)
            whole = sum(q.numel() for q in mine)
            print(f"hetrain: tensor parallelism: {self.place.tp} ranks per stage; rank 0 holds {local:,} of its "
                  f"stage's {whole:,} parameters", flush=True)
        if self.predicted_step_s:
            print(f"hetrain: predicted step {1000 * self.predicted_step_s:.1f} ms (from the plan)", flush=True)
        if self.step:
            print(f"hetrain: resumed from {self.resume_path} at step {self.step}", flush=True)
            if self.cfg.model.dropout > 0:
                print("hetrain: dropout: random state " + (
                    "restored (same layout): the masks of the run resumed" if self.rng_restored else
                    "re-seeded from run.seed: the checkpoint's layout differs, so the masks differ from the run resumed"),
                      flush=True)

    def _save(self, data_state: dict) -> Path:
        meta = ckpt.CheckpointMeta(step=self.step, data_state=data_state, config=to_dict(self.cfg),
                                   plan=self.plan.to_dict(), saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        held_elsewhere = self.sharded.masters_elsewhere if self.sharded is not None else set()
        state = pckpt.training_state(self.named, self.optimizer, self.names, self.cfg.model, self.comm, held_elsewhere)
        return pckpt.save(self.run_dir, state, meta, self.comm, self.cfg.train.keep_checkpoints)

    def _fail(self, error: Exception, saved_at: int) -> None:
        """Name what went wrong and which ranks stopped answering, then leave without touching the groups."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        p = self.place
        print(f"hetrain: error: rank {p.rank} (pipeline {p.pipeline} replica {p.replica} stage {p.stage} "
              f"tp {p.tp_rank}, {p.kind}) stopped at step {self.step + 1}: {type(error).__name__}: {first}",
              file=sys.stderr, flush=True)
        silent = roll_call(p.rank, self.layout.world, roll_call_s(self.cfg.run.dist_timeout_s))
        if silent:
            names = ", ".join(f"rank {r} ({self.layout.places[r].group}, stage {self.layout.places[r].stage})"
                              for r in silent)
            limit = self.cfg.run.dist_timeout_s
            print(f"hetrain: error: no answer from {names} within run.dist_timeout_s={limit:g} s: "
                  f"hung or dead; the job stops; last checkpoint: "
                  f"{'step ' + str(saved_at) if saved_at > 0 else 'none'}",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)

    def _report(self, result: TrainResult) -> None:
        """Rank 0: predicted beside measured (step, per-stage compute); trace.json of every rank."""
        from hetrain.trace import write_chrome_trace

        measured = [self.place.pipeline, self.place.stage, self.place.replica, self.place.tp_rank, self.place.kind,
                    self.clock.fwd_s, self.clock.fwd_count, self.clock.bwd_s, self.clock.bwd_count,
                    len(self.place.chunks)]
        lg = self.ledger
        recomputed = (lg.ahead_s, self.run.wait_stats.hidden_s, lg.demand_s, lg.regions_ahead, lg.regions_left,
                      result.step - self.start_step, lg.collective_hidden_s, lg.collective_after_s,
                      lg.regions_collective, lg.collective_left)
        gathered = [None] * self.layout.world if self.is_main else None
        dist.gather_object((measured, self.clock.events, recomputed), gathered, dst=0, group=self.comm.control)
        if not self.is_main:
            return
        events = [e for _, evs, _ in gathered for e in evs]
        if events:
            write_chrome_trace(sorted(events, key=lambda e: e.start_s), self.run_dir / "trace.json",
                               metadata={"source": "hetrain train --plan.file (cluster plan)",
                                         "ranks": self.layout.world})
        steps = result.step_times_s[1:] or result.step_times_s
        if not steps:
            return
        median_s = statistics.median(steps)
        if self.predicted_step_s:
            print(f"hetrain: predicted vs measured: step {1000 * self.predicted_step_s:.1f} ms vs "
                  f"{1000 * median_s:.1f} ms median (x{median_s / self.predicted_step_s:.2f})", flush=True)
        predicted = {(s["pipeline"], s["stage"]): s for s in self.plan.prediction.get("stages", [])}
        print("hetrain: per stage, one micro-batch (replica 0, TP rank 0): predicted fwd / bwd ms vs measured "
              "fwd / bwd ms (measured: compute of the traced steps, waits excluded)")
        for (pipe, stage, replica, tp_rank, kind, fwd, nf, bwd, nb, n_chunks), _, _ in gathered:
            if replica or tp_rank or not nf:
                continue
            mb_f, mb_b = 1000 * fwd / nf * n_chunks, 1000 * bwd / max(nb, 1) * n_chunks
            pred = predicted.get((pipe, stage))
            pred_txt = f"{1000 * pred['fwd_s']:.2f} / {1000 * pred['bwd_s']:.2f}" if pred else "-"
            print(f"hetrain:   P{pipe} S{stage} {kind}: {pred_txt} vs {mb_f:.2f} / {mb_b:.2f}", flush=True)
        self._report_recompute(gathered)

    def _report_recompute(self, gathered: list) -> None:
        """Rank 0: per stage, the recomputation per step ahead of backwards (and how much of it ran
        while the gradient was on its way), inside tensor-parallel all-reduces (and how much of it
        before they ended) and on demand inside backwards (every step run)."""
        rows = [(m[0], m[1], r) for m, _, r in gathered if not m[2] and not m[3] and (r[0] or r[2] or r[6] or r[7])]
        if not rows:
            return
        print("hetrain: recomputation per step (replica 0, TP rank 0; every step of this run): ahead of backwards "
              "(of it inside gradient waits), inside TP all-reduces (of it before they ended), on demand inside "
              "backwards", flush=True)
        for pipe, stage, r in rows:
            ahead_s, hidden_s, demand_s, n_ahead, n_left, steps, in_s, after_s, n_in, n_in_left = r
            per = 1000 / max(steps, 1)
            share = f" ({100 * hidden_s / ahead_s:.0f}% inside waits)" if ahead_s else ""
            inside, counts = "", ""
            if in_s or after_s or n_in or n_in_left:
                inside = f"{per * (in_s + after_s):.2f} ms inside all-reduces ({per * in_s:.2f} ms before they ended), "
                counts = f"; {n_in} regions inside all-reduces, {n_in_left} left to their backward"
            print(f"hetrain:   P{pipe} S{stage}: {per * ahead_s:.2f} ms ahead{share}, {inside}"
                  f"{per * demand_s:.2f} ms on demand; {n_ahead} regions ahead, {n_left} left to their backward"
                  f"{counts}", flush=True)


def _describe_dtypes(cfg: Config, plan: ClusterPlan) -> str:
    """What the run computes in (train.dtype), and whether the plan was priced for it
    (--plan.dtype, bf16 by default). bf16 runs as a bf16 plan is priced (hetrain.precision): one
    bf16 copy of the weights per step, bf16 activations and stage boundaries, fp32 masters,
    gradients and AdamW state. It is opt-in (--train.dtype bf16), as in every runtime."""
    what = ("bf16 (one bf16 copy of the fp32 weights per step, or under ZeRO-1 bf16 weights held between steps; "
            "bf16 activations, fp32 gradients and optimizer)" if cfg.train.dtype == "bf16" else "fp32")
    priced = (plan.options or {}).get("compute_dtype", "bf16")
    if priced != cfg.train.dtype:
        what += (f"; the plan was priced for {priced} (--plan.dtype), so its predicted step and memory "
                 f"describe another run than this one")
    return what


def _cluster_peak_flops(cfg: Config, plan: ClusterPlan, layout: Layout) -> float:
    """The peak FLOP/s MFU counts against: log.peak_flops per process if declared, otherwise the
    plan's cluster figures (catalog peaks with the cluster file's overrides) for the dtype the
    run computes in."""
    if cfg.log.peak_flops > 0:
        return cfg.log.peak_flops * layout.world
    from hetrain.hardware.cluster import cluster_from_dict

    used = {p.group for p in layout.places}
    return sum(g.devices * g.kind.peak_flops_per_s(cfg.train.dtype) for g in cluster_from_dict(plan.cluster).groups
               if g.name in used)


def _optimizer(chunks: list[nn.Module], cfg: Config, device: torch.device,
               owned: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """One process's AdamW (make_optimizer: groups, hyper-parameters, fused), each group split into
    its DTensor and its plain parameters: a fused kernel takes one kind of tensor. With `owned`
    (ZeRO-1), over those parameters only."""
    from torch.distributed.tensor import DTensor

    base = make_optimizer(nn.ModuleList(chunks), cfg, device)
    keep = None if owned is None else {id(p) for p in owned}
    groups = []
    for group in base.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for sharded in (False, True):
            params = [p for p in group["params"] if isinstance(p, DTensor) == sharded
                      and (keep is None or id(p) in keep)]
            if params or keep is not None:  # under ZeRO-1 empty groups keep the hyper-parameters
                groups.append({**hyper, "params": params})
    return torch.optim.AdamW(groups, fused=True)


def _check_compatible(cfg: Config, saved: dict, path: Path) -> None:
    """A resume must train the same model on the same data; the layout may change."""
    now = to_dict(cfg)
    for section in ("model", "data", "hf"):
        for key, value in saved.get(section, {}).items():
            if now[section].get(key) != value:
                raise ConfigError(f"checkpoint '{path}' was made with {section}.{key}={value!r}, this run has "
                                  f"{now[section].get(key)!r}; resume with the same {section} (and a plan for it)")
