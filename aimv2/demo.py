"""`aimv2 demo` (what `make demo` runs): the main job on the embedded synthetic dataset.

1. generates the embedded captioned dataset (webdataset shards, cached after the first run) and a
   held-out validation set drawn with another seed;
2. pre-trains AIMv2 on it: `aimv2-tiny` for a few minutes on a CPU, a bigger preset and batch on a GPU;
3. runs the attentive probe (SPEC §6) on the trained encoder and on a randomly initialised encoder of
   the same size — the baseline every probe result is read against;
4. prints where the checkpoint, metrics and plots are, and both probe results.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

DEFAULTS = {  # device -> (preset, batch, steps, train images, val images, image size of the shards)
    # NOTE ~68 img/s for aimv2-tiny at batch 32 on an idle 2-core CPU (measured): 400 steps ~ 3-4 min
    "cpu": ("aimv2-tiny", 32, 400, 20000, 2000, 224),
    "cuda": ("aimv2-large", 128, 1500, 20000, 2000, 224),
}


def run_demo(out: str | None = None, *, preset: str | None = None, batch_size: int | None = None,
             steps: int | None = None, num: int | None = None, probe: bool = True,
             probe_epochs: int = 20, progress: bool = True, max_minutes: float | None = None) -> dict:
    from aimv2.data import default_dataset
    from aimv2.train import TrainConfig, train

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d_preset, d_batch, d_steps, d_num, d_val, size = DEFAULTS[dev]
    preset, batch_size, steps, num = preset or d_preset, batch_size or d_batch, steps or d_steps, num or d_num
    t0 = time.time()
    if out is None:                  # a fresh run directory each time: earlier demos are never touched
        out = time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"[demo] device {dev}: {preset}, batch {batch_size}, {steps} steps, {num} synthetic images")
    train_shards = default_dataset(num=num, size=size, seed=0, progress=progress)
    val_shards = default_dataset(num=d_val, size=size, seed=1, progress=progress)
    print(f"[demo] data: train {train_shards}\n              val   {val_shards}")

    cfg = TrainConfig.from_preset(preset, **{
        "data.shards": train_shards, "data.batch_size": batch_size,
        "run.out": out, "run.steps": steps, "run.log_every": max(1, steps // 60),
        "run.ckpt_every": max(1, steps // 3), "run.progress": progress, "run.max_minutes": max_minutes,
        # the synthetic set has ~20k images: a short warm-up, the SPEC betas / clipping / schedule
        "optim.lr": 1e-3 if preset == "aimv2-tiny" else 3e-4, "optim.warmup_steps": max(1, steps // 20),
    })
    res = train(cfg)
    summary = {
        "device": dev, "preset": preset, "steps": res.step, "batch_size": batch_size,
        "run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint), "metrics": str(res.metrics),
        "plots": [str(p) for p in res.plots], "final_loss": res.loss, "pixel_loss": res.pixel_loss,
        "text_loss": res.text_loss, "images_per_s": res.images_per_s,
    }
    if probe:
        from aimv2.eval.probe import run_probe
        common = dict(train_shards=train_shards, val_shards=val_shards, label_key="label",
                      epochs=probe_epochs, progress=progress, feature_cache=str(Path(out) / "probe-cache"))
        trained = run_probe(str(res.run_dir), **common)
        rand = run_probe(str(res.run_dir), random_init=True, **common)
        summary.update(probe_top1=trained["top1"], probe_top1_random_init=rand["top1"],
                       probe_num_classes=trained["num_classes"])
    summary["minutes"] = round((time.time() - t0) / 60, 2)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo-summary.json").write_text(json.dumps(summary, indent=2))

    print("\n[demo] done in {:.1f} min".format(summary["minutes"]))
    print(f"  checkpoint   {summary['checkpoint']}")
    print(f"  metrics      {summary['metrics']}")
    for p in summary["plots"]:
        print(f"  plot         {p}")
    print(f"  final loss   {res.loss:.4f} (pixel {res.pixel_loss:.4f}, text {res.text_loss:.4f})"
          if res.loss is not None else "  final loss   n/a")
    if probe:
        print(f"  probe top-1  trained encoder {summary['probe_top1']:.2f}%  vs  random-init encoder "
              f"{summary['probe_top1_random_init']:.2f}%  ({summary['probe_num_classes']} classes)")
    print(f"  summary      {Path(out) / 'demo-summary.json'}")
    return summary


def cmd_demo(args) -> int:
    run_demo(args.out, preset=args.preset, batch_size=args.batch_size, steps=args.steps, num=args.num,
             probe=not args.no_probe, probe_epochs=args.probe_epochs, max_minutes=args.max_minutes)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate the embedded dataset, train, probe (what `make demo` runs)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<date>-<time>)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget for training (checkpoint and stop when reached)")
    p.add_argument("--preset", default=None, help="default: aimv2-tiny on a CPU, aimv2-large on a GPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--num", type=int, default=None, help="synthetic training images (default 20000)")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--no-probe", action="store_true")
    p.set_defaults(func=cmd_demo)
