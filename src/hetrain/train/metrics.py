"""Where a run's figures go: one console line per logged step, metrics.jsonl, TensorBoard.

This module formats and writes; it measures nothing about the model itself (the trainer
hands it numbers). It also owns the device peak used for MFU: the catalog's figure on a
GPU, or a short matmul measurement on CPU (a CPU has no datasheet peak worth trusting).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from hetrain.files import write_atomic
from hetrain.units import fmt_bytes


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                         min_s: float = 0.5) -> float:
    """Best FLOP/s of an n x n matmul on `device` over at least `min_s` seconds of tries.

    The best try, not the mean: the figure stands for the device's peak, and any try slowed
    by another process or a cold thread pool only understates it. The operands come from a
    generator of its own: the global RNG (restored from a checkpoint on resume) is not touched.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best, spent = float("inf"), 0.0
    while spent < min_s:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best


def device_peak_flops(device: torch.device, dtype: torch.dtype, declared: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if declared > 0:
        return declared, "declared (log.peak_flops)"
    if device.type == "cuda":
        try:
            from hetrain.hardware.probe import probe

            kinds = [g.kind for g in probe().accelerators if g.kind is not None]
            if kinds:
                key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
                return kinds[0].peak_flops[key], f"catalog ({kinds[0].name}, {key})"
        except Exception:  # an unknown GPU falls back to measuring
            pass
    return measure_matmul_flops(device, dtype), "measured (matmul)"


class MetricsLogger:
    """Writes each logged step to run_dir/metrics.jsonl (one JSON object per line) and TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.path.exists():
            # Keep only the records up to the step this run starts from (none for a new run): later
            # ones belong to steps that run again, or to an earlier run in this folder that left no
            # checkpoint. A torn last line (a kill mid-write) is dropped with them.
            kept = []
            for ln in self.path.read_text().splitlines():
                try:
                    if json.loads(ln).get("step", 0) <= resume_step:
                        kept.append(ln)
                except json.JSONDecodeError:
                    continue
            write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides earlier events of this folder from that step on.
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def format_line(r: dict) -> str:
    """The console line of one logged step."""
    parts = [f"step {r['step']:>6d}", f"loss {r['loss']:.4f}"]
    if r.get("val_loss") is not None:
        parts.append(f"val {r['val_loss']:.4f}")
    parts += [
        f"lr {r['lr']:.2e}",
        f"gnorm {r['grad_norm']:.3f}",
        f"{r['tokens_per_s']:,.0f} tok/s",
        f"mfu {100 * r['mfu']:.1f}%",
        f"step {1000 * r['step_s']:.0f} ms",
        f"peak {fmt_bytes(r['peak_device_bytes'])}",
    ]
    return " | ".join(parts)
