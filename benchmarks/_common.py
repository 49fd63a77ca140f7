"""Shared benchmark helpers: timing, ceilings, result rows and files (schema in CONVENTIONS.md).

    bench(fn)            -> (median, p20, p80) ms; triton.testing.do_bench on a GPU, a wall-clock
                            loop on the CPU (interpreter smoke runs only, never reported)
    peak_mem_mb(fn)      -> MB allocated by one call of fn above what was live before it (GPU)
    measure_ceilings()   -> {"copy_gbps", "bf16_tflops", "datasheet_bf16_tflops"} measured here
    load_ceilings(path)  -> the ceilings a `gpu_all.py` ceilings stage wrote (measured again without one)
    result_row(...)      -> one row dict: device, date, git_sha, torch, triton, command + the fields
    ResultFile(what, out_dir=None, extra=None)
                         -> benchmarks/results/<what>-<device>-<date>.json, one JSON list of rows,
                            rewritten whole (temp file + rename) after every .add(row): a run stopped
                            at any moment leaves a valid file with every row measured so far

Imported by the benchmark scripts as `from _common import ...` (benchmarks/ is put on sys.path by
each script and by pytest's rootdir-relative import of files without __init__.py).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# bf16 dense tensor-core peak from the datasheets (TFLOP/s), to put the measured ceiling in context
_DATASHEET_BF16 = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                   "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, 20th percentile, 80th percentile) of fn's run time in ms."""
    if torch.cuda.is_available():
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    fn()                                                    # CPU: smoke timing, 3 runs
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def peak_mem_mb(fn) -> float | None:
    """Peak MB allocated while fn runs, above the memory live before it (None off the GPU)."""
    if not torch.cuda.is_available():
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_ceilings(copy_mb: int = 1024, n: int = 8192, cpu: bool = False) -> dict:
    """Measured device ceilings: device-to-device copy bandwidth (GB/s, read + write bytes) of a
    copy_mb buffer, and bf16 matmul TFLOP/s of an (n x n) @ (n x n) product. Without CUDA: {} unless
    cpu=True (the dry run's plumbing check; pass small sizes)."""
    if not torch.cuda.is_available() and not cpu:
        return {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(copy_mb * 2**20, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))[0]
    copy_gbps = 2 * src.numel() / (ms * 1e-3) / 1e9
    del src, dst
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)[0]
    name = device_name()
    sheet = next((v for k, v in _DATASHEET_BF16.items() if k in name), None)
    return {"copy_gbps": copy_gbps, "bf16_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
            "datasheet_bf16_tflops": sheet}


def load_ceilings(path=None) -> dict:
    """The ceilings of a ceilings result file (rows with a `ceilings` dict, see gpu_all.py), or
    measured here when no path is given. A missing or unreadable file is an error, not a silent 0."""
    if path is None:
        return measure_ceilings()
    rows = json.loads(Path(path).read_text())
    if not rows or not isinstance(rows[0].get("ceilings"), dict):
        raise ValueError(f"--ceilings {path}: expected a JSON list of rows with a 'ceilings' dict")
    return rows[0]["ceilings"]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """HEAD's commit (read-only), or 'unknown' outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "triton": tv}


def result_row(*, op: str, pass_: str, shape: str, dtype: str, provider: str, ms: float,
               ms_p20: float | None = None, ms_p80: float | None = None, tflops: float | None = None,
               gbps: float | None = None, pct_of_ceiling: float | None = None,
               peak_mem_mb: float | None = None, command: str | None = None, **extra) -> dict:
    """One result row (CONVENTIONS.md schema); `pass_` is written as "pass"."""
    row = {"device": device_name(), "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
           "git_sha": git_sha(), **_versions(),
           "command": command if command is not None else " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "op": op, "pass": pass_, "shape": shape, "dtype": dtype, "provider": provider, "ms": ms,
           "ms_p20": ms_p20, "ms_p80": ms_p80}
    if tflops is not None or gbps is None:
        row["tflops"] = tflops
    if gbps is not None:
        row["gbps"] = gbps
    row.update(pct_of_ceiling=pct_of_ceiling, peak_mem_mb=peak_mem_mb, **extra)
    return row


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM for the body: one that arrives is recorded and re-raised after it.

    A thread mask is not enough (torch's worker threads would take the signal and Python would
    still raise in the main thread mid-body); Python runs signal handlers only in the main thread,
    so elsewhere nothing can interrupt the body and nothing needs holding."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = [signal.SIGINT, signal.SIGTERM]
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in caught:
            signal.raise_signal(s)


class ResultFile:
    """The rows of one run in <out_dir or benchmarks/results>/<what>-<device>-<date>.json.

    Each add() rewrites the file whole as one JSON list (to a temp file, then os.replace), so the
    file is valid after every row and a run stopped at any moment (SIGINT, a time limit, SIGKILL)
    keeps every row measured before it. `extra` (e.g. the measured ceilings) is added to every row.
    A run starts its file afresh (same name on the same day: the later run replaces the earlier).
    """

    def __init__(self, what: str, out_dir=None, extra: dict | None = None):
        out = Path(out_dir) if out_dir is not None else RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        dev = re.sub(r"[^A-Za-z0-9.]+", "-", device_name()).strip("-")
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        self.path = out / f"{what}-{dev}-{date}.json"
        self.extra = dict(extra or {})
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        # SIGINT/SIGTERM are held (not lost) while the row is appended and the file replaced, so
        # `self.rows` and the file never disagree: a KeyboardInterrupt raised between the two would
        # report a row as kept that the file does not hold. The held signal is delivered on exit.
        with _signals_held():
            rows = self.rows + [{**row, **self.extra}]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(rows, indent=1, default=str) + "\n")
            os.replace(tmp, self.path)
            self.rows = rows

    def extend(self, rows) -> None:
        for r in rows:
            self.add(r)


def write_results(rows: list[dict], what: str, out_dir=None, extra: dict | None = None) -> Path:
    """All of rows at once into a fresh ResultFile; returns its path."""
    results = ResultFile(what, out_dir, extra)
    results.extend(rows)
    return results.path


def result_file(what: str, out_dir=None, quick: bool = False, ceilings: dict | None = None) -> ResultFile:
    """A benchmark CLI's result file: a temp dir for a --quick smoke run unless out_dir is given,
    benchmarks/results otherwise; every row carries the run's measured ceilings."""
    import tempfile
    out = out_dir or (tempfile.mkdtemp(prefix="aimv2-bench-") if quick else None)
    return ResultFile(what, out, extra={"ceilings": ceilings or {}})


def finish(results: ResultFile, interrupted: bool = False) -> int:
    """End of a benchmark CLI: say where the rows are; exit code 130 when stopped by SIGINT."""
    how = "stopped by SIGINT; kept" if interrupted else "wrote"
    print(f"{how} {len(results.rows)} rows to {results.path}", flush=True)
    return 130 if interrupted else 0


def gpu_session(what: str):
    """Body of a benchmark module's pytest fixture: skip without CUDA, measure the ceilings once,
    append the tests' rows to the module's result file as each test measures them.

        @pytest.fixture(scope="module")
        def _session():
            yield from gpu_session("attention")
    """
    import pytest
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ceilings = measure_ceilings()
    state = {"ceilings": ceilings, "results": ResultFile(what, extra={"ceilings": ceilings})}
    yield state
    if state["results"].rows:
        finish(state["results"])
