"""Throughput accounting and the metrics log (metrics.jsonl, optional TensorBoard).

One JSON row per log interval (values averaged over the interval's non-skipped steps and all ranks):
    step, loss, pixel_loss, text_loss, lr, grad_norm,
    images_per_s    global images per second (all ranks) over the interval,
    tokens_per_s    images_per_s * (N + text_len), N = image patches,
    tflops          images_per_s * flops_per_sample(cfg) / 1e12 (all ranks; unmasked attention only;
                    native mode: each image's flops_per_sample at its own patch count, summed),
    mfu             tflops / (world_size * device bf16 dense peak); null when the peak is unknown,
    peak_mem_mb     CUDA max_memory_allocated on rank 0 (on a CPU: the process's peak RSS),
    data_wait_pct   % of the interval's wall time rank 0 spent waiting in next(loader),
    skipped_samples samples the data loader skipped so far (corrupt / undecodable; loader.stats()),
    skipped_steps   optimizer steps skipped so far for a non-finite loss or gradient,
    elapsed_s       wall seconds since the run (or the resume) started.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), matched against
# torch.cuda.get_device_name() in order: the first substring that matches wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),             # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),             # fp16 (no bf16 tensor cores)
]


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Per-device bf16 peak in TFLOP/s, or None (CPU / unknown GPU: MFU is then not reported)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    """bf16 dense peak of a device named `name` (torch.cuda.get_device_name), None if unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:               # a torn last line after a kill
                pass
    return rows


class MetricsWriter:
    """Append-only JSONL writer (rank 0). On resume, rows after the resumed step are dropped first,
    so the file is one clean history of the run."""

    def __init__(self, path: str | Path, resume_step: int | None, tensorboard: bool | None, log_dir: Path):
        self.path = Path(path)
        if resume_step is not None:
            keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a")
        self.tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(log_dir))
            except ImportError as e:
                if tensorboard:
                    raise ValueError(f"run.tensorboard=true but TensorBoard is not importable: {e}") from None

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()
