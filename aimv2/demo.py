"""`aimv2 demo` (what `make demo` runs): the main job on the embedded synthetic dataset, and the proof
that pre-training taught the encoder something.

1. generates the embedded captioned dataset at the training resolution (webdataset shards, cached after
   the first run) and a held-out validation set drawn with another seed;
2. pre-trains AIMv2 on it: `aimv2-tiny` for a few minutes on a CPU, a bigger preset and batch on a GPU;
3. reads the result twice, each time for the trained model and for a randomly initialised one of the
   same config (the baseline every number is read against):
   - attentive probe (method.md §6) on the frozen encoder, label = the scene's structure as the caption
     states it (how many shapes, the main one's size and texture: 21 classes; colours, kinds, positions and
     background vary within a class, see `aimv2.data.synth`);
   - the decoder's next-token accuracy on the caption's content words (shape, colour, size, position,
     texture words) with the true image vs another sample's image, and its pixel head's error against
     the next patch vs its own input patch (`aimv2.eval.readout`);
4. prints where the checkpoint, metrics and loss curve are, both readouts, and what they mean.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Recipe:
    preset: str
    img_size: int        # training resolution; the dataset is rendered at this size (no resize on load)
    text_len: int        # caption tokens (the synthetic captions need <= 29 with eos)
    batch_size: int
    steps: int
    lr: float
    warmup_frac: float
    num: int             # training images
    val: int             # validation images (another seed)


RECIPES = {
    # NOTE 56 px (4 x 4 patches of 14) and 32 caption tokens (the captions need <= 29) instead of 112 px and
    # 77: a step of batch 32 at 56 px took 0.45x the time of one at 112 px (both 77 tokens, shared 2-core CPU,
    # load ~4; benchmarks/results/demo-signal-cpu-2026-11-29.json). 2,500 steps: idle, a step takes ~0.15 s and
    # `make demo` took 8.3 min in all (2,000 steps: 6.0 min, probe 2.1x; 3,000: 9.1 min, 2.6x). LR 2e-3 is the
    # largest that works: at 800 steps 5e-3 and 1e-2 ended at loss 1.00 / 1.25 against 0.84, and batch 64 at
    # 4e-3 (the same images) at 1.00 (benchmarks/results/demo-signal-recipe-cpu-2026-11-30.json). Eager: the
    # compiled step was no faster on the CPU (228 vs 239 img/s after warm-up, 200 steps).
    "cpu": Recipe("aimv2-tiny", 56, 32, 32, 2500, 2e-3, 0.05, 20000, 2000),
    "cuda": Recipe("aimv2-large", 224, 77, 128, 1500, 3e-4, 0.05, 20000, 2000),
}
# The synthetic JSON field the probe predicts: how many shapes, the main one's size and its texture (21
# classes; colour, kind, position and background vary within a class). NOTE history, measured
# (benchmarks/results/demo-signal-labels-cpu-2026-11-30.json, -recipe-cpu-2026-11-30.json): the main shape's
# kind, the target until 2026-11-30, is barely learned at 56 px (24.1 % vs 23.4 % random-init after 1,500
# steps); the layout with the relation to the second shape (synth `layout`) reached 1.89x, then 1.94x at 2,500
# steps: a one-query attentive probe reads where a shape lies only barely (the main shape's quadrant 34.9 %
# vs 28.9 % random; the relation in two-shape scenes 29 % vs 25 % chance), so that label was capped by its
# position part. With textures equally likely (synth VERSION 4) the present label reached 33.6 % vs 14.0 %
# random-init (2.4x) after 2,400 steps.
PROBE_LABEL = "scene"


def _train_config(r, train_shards, out: str, num_workers: int, progress: bool, max_minutes):
    """The TrainConfig of recipe `r` on the embedded dataset's `train_shards`."""
    from aimv2.train import TrainConfig

    return TrainConfig.from_preset(r.preset, **{
        "model.img_size": r.img_size, "model.text_len": r.text_len,
        "data.shards": train_shards, "data.batch_size": r.batch_size, "data.num_workers": num_workers,
        # the captions say "to the left of" / "to the right of": a mirrored image would make them false
        "data.hflip": False,
        "run.out": out, "run.steps": r.steps, "run.log_every": max(1, r.steps // 60),
        "run.ckpt_every": max(1, r.steps // 3), "run.progress": progress, "run.max_minutes": max_minutes,
        "optim.lr": r.lr, "optim.warmup_steps": max(1, int(r.warmup_frac * r.steps)),
    })


def _demo_probe(summary: dict, run_dir: str, train_shards, val_shards, out: str, epochs: int, progress: bool,
                num_workers: int) -> None:
    """The attentive probe of the trained and of a random-init encoder, into `summary`."""
    from aimv2.data.synth import SCENES_OCCURRING
    from aimv2.eval.probe import run_probe

    t1 = time.time()
    common = dict(train_shards=train_shards, val_shards=val_shards, label_key=PROBE_LABEL,
                  epochs=epochs, progress=progress, num_workers=num_workers,
                  feature_cache=str(Path(out) / "probe-cache"))
    trained = run_probe(run_dir, **common)
    rand = run_probe(run_dir, random_init=True, **common)
    summary.update(probe_label="scene: count, main size, main texture", probe_top1=trained["top1"],
                   probe_top1_random_init=rand["top1"], probe_num_classes=SCENES_OCCURRING,
                   probe_chance=trained["majority_top1"])
    summary["seconds"]["probe"] = round(time.time() - t1, 1)


def _demo_readout(summary: dict, run_dir: str, val_shards, num_workers: int) -> None:
    """The decoder's readouts of the trained and of a random-init pre-trainer, into `summary`."""
    from aimv2.eval.readout import load_pretrainer, random_pretrainer_like, run_readout

    t1 = time.time()
    model = load_pretrainer(run_dir)
    summary["readout"] = run_readout(model, val_shards, num_workers=num_workers)
    summary["readout_random_init"] = run_readout(random_pretrainer_like(model), val_shards, num_workers=num_workers)
    summary["seconds"]["readout"] = round(time.time() - t1, 1)


def run_demo(out: str | None = None, *, preset: str | None = None, batch_size: int | None = None,
             steps: int | None = None, num: int | None = None, val: int | None = None,
             img_size: int | None = None, lr: float | None = None, probe: bool = True,
             probe_epochs: int = 20, readout: bool = True, progress: bool = True,
             max_minutes: float | None = None, data_root: str | None = None,
             num_workers: int = 2) -> dict:
    """Train, probe and read out (see the module docstring); returns the summary dict (also written to
    <out>/demo-summary.json). data_root: where the datasets are cached (default: default_dataset's)."""
    from aimv2.data.synth import default_dataset
    from aimv2.train import train

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    r = RECIPES[dev]
    r = dataclasses.replace(r, **{k: v for k, v in dict(
        preset=preset, batch_size=batch_size, steps=steps, num=num, val=val, img_size=img_size, lr=lr).items()
        if v is not None})
    t0 = time.time()
    if out is None:                  # a fresh run directory each time: earlier demos are never touched
        out = time.strftime("runs/demo-%Y%m%d-%H%M%S")
    print(f"[demo] device {dev}: {r.preset} at {r.img_size} px, batch {r.batch_size}, {r.steps} steps, "
          f"lr {r.lr:g}, {r.num} synthetic images")

    def data(n, seed):
        root = None if data_root is None else os.path.join(data_root, f"synth-{r.img_size}-{n}-{seed}")
        return default_dataset(root, num=n, size=r.img_size, seed=seed, progress=progress)

    train_shards, val_shards = data(r.num, 0), data(r.val, 1)
    t_data = time.time() - t0
    print(f"[demo] data ({t_data:.0f} s): train {train_shards}\n              val   {val_shards}")

    t1 = time.time()
    res = train(_train_config(r, train_shards, out, num_workers, progress, max_minutes))
    t_train = time.time() - t1
    plots = [str(p) for p in res.plots]
    summary = {
        "device": dev, "recipe": dataclasses.asdict(r), "steps": res.step, "batch_size": r.batch_size,
        "run_dir": str(res.run_dir), "checkpoint": str(res.checkpoint), "metrics": str(res.metrics),
        "plots": plots, "loss_curve": next((p for p in plots if "loss" in Path(p).name), None),
        "final_loss": res.loss, "pixel_loss": res.pixel_loss, "text_loss": res.text_loss,
        "images_per_s": res.images_per_s, "seconds": {"data": round(t_data, 1), "train": round(t_train, 1)},
    }
    if probe:
        _demo_probe(summary, str(res.run_dir), train_shards, val_shards, out, probe_epochs, progress, num_workers)
    if readout:
        _demo_readout(summary, str(res.run_dir), val_shards, num_workers)
    summary["minutes"] = round((time.time() - t0) / 60, 2)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def verdict(s: dict) -> str:
    """One line saying what the readouts mean (read from the numbers, not assumed)."""
    parts, ok = [], True
    if "probe_top1" in s:
        ratio = s["probe_top1"] / max(s["probe_top1_random_init"], 1e-9)
        ok &= ratio >= 2.0
        parts.append(f"a probe reads the scene (how many shapes, how big and how textured the main one is) from the "
                     f"trained encoder {ratio:.1f}x as often as from a random one (colour, which a random encoder "
                     f"passes through, does not tell it)")
    if "readout" in s:
        gap = s["readout"]["gap"]
        ok &= gap >= 20.0
        parts.append(f"the decoder names the scene's shapes, colours and positions {gap:.0f} points more often "
                     f"with the true image than with another one" + (", so it reads them off the encoder"
                                                                        if gap >= 20.0 else ""))
    if not parts:
        return "no readout was run"
    head = "Pre-training taught the encoder the scene: " if ok else \
        "Weaker than expected (trained/random < 2x or gap < 20 points; train longer with --steps): "
    return head + "; ".join(parts) + "."


def _print_summary(s: dict) -> None:
    print("\n[demo] done in {:.1f} min ({})".format(
        s["minutes"], ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())))
    print(f"  checkpoint   {s['checkpoint']}")
    print(f"  metrics      {s['metrics']}")
    print(f"  loss curve   {s['loss_curve'] or 'n/a (plots off)'}")
    if s["final_loss"] is not None:
        print(f"  final loss   {s['final_loss']:.4f} (pixel {s['pixel_loss']:.4f}, text {s['text_loss']:.4f})")
    if "probe_top1" in s:
        print(f"  probe top-1  ({s['probe_label']}, {s['probe_num_classes']} classes, majority class "
              f"{s['probe_chance']:.1f}%)  trained {s['probe_top1']:.1f}%  vs  random-init "
              f"{s['probe_top1_random_init']:.1f}%")
    if "readout" in s:
        t, z = s["readout"], s["readout_random_init"]
        print(f"  content-word next-token accuracy (val, {t['words']} words)  trained: true image "
              f"{t['true']:.1f}%  vs  shuffled {t['shuffled']:.1f}%  (gap {t['gap']:.1f} pts);  "
              f"random-init: {z['true']:.1f}% vs {z['shuffled']:.1f}%")
        print(f"  pixel head (trained, val): error against the next patch {t['next_patch_error']:.3f} vs against "
              f"its own input patch {t['same_patch_error']:.3f} (it predicts ahead when the first is lower)")
        print("    by word kind (trained, true / shuffled): " + ", ".join(
            f"{c} {v['true']:.0f}/{v['shuffled']:.0f}" for c, v in t["per_category"].items()))
    print(f"  summary      {Path(s['run_dir']) / 'demo-summary.json'}")
    print(f"  => {verdict(s)}")


def cmd_demo(args) -> int:
    run_demo(args.out, preset=args.preset, batch_size=args.batch_size, steps=args.steps, num=args.num,
             img_size=args.img_size, lr=args.lr, probe=not args.no_probe, probe_epochs=args.probe_epochs,
             readout=not args.no_readout, max_minutes=args.max_minutes)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate the embedded dataset, train, probe (what `make demo` runs)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<date>-<time>)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget for training (checkpoint and stop when reached)")
    p.add_argument("--preset", default=None, help="default: aimv2-tiny on a CPU, aimv2-large on a GPU")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None, help="training resolution (default 56 px on a CPU)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num", type=int, default=None, help="synthetic training images (default 20000)")
    p.add_argument("--probe-epochs", type=int, default=20)
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--no-readout", action="store_true", help="skip the content-word readout")
    p.set_defaults(func=cmd_demo)
