"""FP8 training (issue [fp8], run.float8): bf16 vs torchao float8 (tensorwise, rowwise), side by side.

    python benchmarks/bench_fp8.py                  # step rows at aimv2-large B=128 and aimv2-1b B=64, then the curve
    python benchmarks/bench_fp8.py --max-batch      # each preset's largest batch that fits (bf16), all three there
    python benchmarks/bench_fp8.py --parts curve --curve-steps 300
    python benchmarks/bench_fp8.py --dry            # CPU: tiny model, torchao's emulation, rows to a temp dir

Part `step`: bench_step.py's `aimv2` recipe (Triton kernels, torch.compile per block, bf16 autocast,
fused AdamW, random data on the GPU) timed by bench_step.run_recipe, for three providers at the same
batch: `aimv2` (bf16: the baseline), `aimv2_tensorwise` and `aimv2_rowwise` (the encoder's and
decoder's linears converted by aimv2.train.float8.convert with run.float8's default threshold, as
`aimv2 train --float8 MODE` does). Rows: images/s, TFLOP/s, MFU against the measured bf16 matmul
ceiling, peak memory; the summary prints bf16 ms / float8 ms per row (target: rowwise >= 1.3x at
aimv2-1b, >= 1.15x at aimv2-large).

Part `curve`: `aimv2 train` itself (aimv2.train.train, compiled, Triton kernels, the default recipe)
on the embedded synthetic dataset at aimv2-large, --curve-steps steps, bf16 and run.float8=rowwise with
the same seed and data order. One row per run (op `train_curve`): the logged losses (every 10 steps),
`final_loss` (mean of the last three logged intervals), images/s (median over the intervals after
the first, which holds the compilation); the rowwise row adds `loss_vs_bf16` = final / bf16 final - 1
(target |.| <= 1.5 %). The run directories (with their final checkpoint) are deleted afterwards.

NOTE batches: B=128 at aimv2-large is the committed step-stage batch (55.8 GB peak on an H200 for the
bf16 `aimv2` recipe, so it fits an 80 GB H100); B=64 at aimv2-1b and the curve's B=32 are estimates,
not measured (1b holds ~3.5x large's parameters and ~2x its activations per image; the curve's batch
keeps 2 x 300 steps inside a stage budget). --max-batch measures instead (a compile per try).

--time-left SECONDS: a preset's three step rows, or a curve run, that would start with less than its
estimate left is skipped (said so); rows are appended as measured (SIGINT keeps them, exit 130).
Rows go to benchmarks/results/fp8-<device>-<date>.json (CONVENTIONS.md schema, `pass` = "step").
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("off", "tensorwise", "rowwise")
STEP_PRESETS = {"aimv2-large": 128, "aimv2-1b": 64}
# NOTE estimates, not measured yet: the committed step stage (H200) compiled and timed three aimv2-large
# recipes in 92 s, ~40 s each; aimv2-1b's blocks compile alike and its steps take ~1.5x; a curve run is a
# compile, 300 steps of ~0.07 s at B=32, the dataset (generated once, ~20 s) and a final checkpoint
EST_S = {"aimv2-large": 3 * 40.0, "aimv2-1b": 3 * 50.0, "curve": 90.0}
DRY = {"preset": "aimv2-tiny", "img_size": 56, "batch": 2, "min_dim": 16, "curve_steps": 6, "curve_batch": 4}


def float8_kwargs(mode: str, dry: bool) -> dict | None:
    """aimv2.train.float8.convert's arguments for `mode` (None: bf16); the dry run emulates float8 and
    lowers the threshold so that the tiny model's linears are converted."""
    if mode == "off":
        return None
    from aimv2.train.float8 import MIN_DIM
    return {"mode": mode, "min_dim": DRY["min_dim"] if dry else MIN_DIM, "emulate": dry}


def step_rows(args, device, ceilings, common, results, time_ok) -> None:
    """The three providers of each preset at one batch (bench_step.run_recipe)."""
    import bench_step
    recipe = "eager_ref" if args.dry else "aimv2"        # no Triton compile or FlexAttention backward on a CPU
    for preset, B in args.step_presets:
        if not time_ok(EST_S.get(preset, EST_S["aimv2-1b"]), f"{preset} step rows"):
            continue
        a = copy.copy(args)
        a.preset, a.float8 = preset, None
        if args.max_batch and device.type == "cuda":
            B = bench_step.largest_batch(recipe, a, device, 2 * B) or B
        for mode in MODES:
            a.float8 = float8_kwargs(mode, args.dry)
            try:
                results.add(bench_step.run_recipe(recipe, B, a, device, ceilings, common))
            except Exception as e:                     # noqa: BLE001 - an OOM surfaces as several types
                if not bench_step.is_oom(e):
                    raise
                print(f"{preset} {mode}: out of memory at B={B}; lower --batch")
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _train_run(args, mode: str, out: Path) -> list[dict]:
    """`aimv2 train` at the curve's settings with run.float8=`mode`; its metrics rows."""
    from aimv2.train import TrainConfig, train
    over = {"run.steps": args.curve_steps, "data.batch_size": args.curve_batch, "run.out": str(out),
            "run.log_every": max(1, args.curve_steps // 30), "run.ckpt_every": 0, "run.keep_ckpts": 1,
            "run.progress": False, "run.plot": False, "run.tensorboard": False, "run.float8": mode}
    if args.dry:
        over.update({"model.img_size": DRY["img_size"], "model.depth": 1, "model.dec_depth": 1,
                     "data.synthetic_num": 32, "data.synthetic_size": 64, "data.num_workers": 0,
                     "run.float8_emulate": True, "run.float8_min_dim": DRY["min_dim"]})
    torch._dynamo.reset()
    train(TrainConfig.from_preset(args.curve_preset, **over))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def curve_rows(args, device, common, results, time_ok) -> None:
    from _common import result_row
    base = None
    if not time_ok(2 * EST_S["curve"], "curve (bf16 and rowwise)"):       # both runs or neither
        return
    for mode in ("off", "rowwise"):
        out = Path(tempfile.mkdtemp(prefix=f"aimv2-fp8-curve-{mode}-"))
        try:
            logged = _train_run(args, mode, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        final = statistics.mean(r["loss"] for r in logged[-3:])
        ips = statistics.median(r["images_per_s"] for r in (logged[1:] or logged))
        provider = "aimv2" if mode == "off" else f"aimv2_{mode}"
        row = result_row(op="train_curve", pass_="step", shape=f"B={args.curve_batch},steps={args.curve_steps}",
                         dtype="bf16" if device.type == "cuda" else "fp32", provider=provider,
                         ms=1e3 * args.curve_batch / ips, **common)
        row.update(preset=args.curve_preset, batch=args.curve_batch, images_per_s=ips, final_loss=final,
                   losses=[[r["step"], r["loss"]] for r in logged],
                   peak_mem_mb=max((r.get("peak_mem_mb") or 0) for r in logged) or None)
        if base is None:
            base = final
        else:
            row["loss_vs_bf16"] = final / base - 1
        results.add(row)
        print(f"curve {provider:>14}  final loss {final:.4f}" + (f" ({100 * row['loss_vs_bf16']:+.2f} % vs bf16)"
                                                              if "loss_vs_bf16" in row else "") + f"  {ips:.1f} img/s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=",".join(STEP_PRESETS), help="step-row presets (comma-separated)")
    ap.add_argument("--batch", type=int, default=None, help="one batch for every preset (default: large 128, 1b 64)")
    ap.add_argument("--max-batch", action="store_true", help="search each preset's largest bf16 batch (halving on OOM)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--parts", default="step,curve", help="step, curve or both (comma-separated)")
    ap.add_argument("--curve-preset", default="aimv2-large")
    ap.add_argument("--curve-steps", type=int, default=300)
    ap.add_argument("--curve-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="add each step row's GPU-time shares (3 profiled steps)")
    ap.add_argument("--time-left", type=float, default=None, help="seconds this run may take (see the docstring)")
    ap.add_argument("--dry", action="store_true", help="CPU run: tiny model, torchao's float8 emulation")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --dry)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()

    from _common import finish, load_ceilings, result_file

    from aimv2.train.float8 import unavailable_reason
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.dry:
        print("bench_fp8: no CUDA device; use --dry for a CPU run", file=sys.stderr)
        return 2
    reason = unavailable_reason("rowwise", device, emulate=args.dry)
    if reason is not None:
        print(f"bench_fp8: {reason}", file=sys.stderr)
        return 2
    parts = set(args.parts.split(","))
    if not parts <= {"step", "curve"}:
        ap.error(f"--parts: expected step and/or curve, got {args.parts!r}")
    names = [p for p in args.presets.split(",") if p]
    if args.dry:
        # NOTE one intra-op thread: on the shared 2-core CI machine the emulated float8 step took 5.0 s
        # with 2 threads under load (tests/conftest.py one_thread has the same reason)
        torch.set_num_threads(1)
        args.img_size, args.warmup, args.iters, args.curve_preset = DRY["img_size"], 1, 2, DRY["preset"]
        args.curve_steps, args.curve_batch = DRY["curve_steps"], DRY["curve_batch"]
        names = [DRY["preset"]]
    args.step_presets = [(p, args.batch or (DRY["batch"] if args.dry else STEP_PRESETS.get(p, 64))) for p in names]
    ceilings = load_ceilings(args.ceilings) if device.type == "cuda" or args.ceilings else {}
    common = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))}
    results = result_file("fp8", args.out, args.dry, ceilings)

    def time_ok(need_s: float, what: str) -> bool:
        left = None if args.time_left is None else args.time_left - (time.monotonic() - t_start)
        if left is not None and left < need_s and not args.dry:
            print(f"{what}: skipped, {left:.0f} s left and it needs ~{need_s:.0f} s")
            return False
        return True

    try:
        if "step" in parts:
            step_rows(args, device, ceilings, common, results, time_ok)
        if "curve" in parts:
            curve_rows(args, device, common, results, time_ok)
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
