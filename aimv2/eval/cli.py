"""`aimv2 probe` (attentive probe top-1) and `aimv2 embed` (features to safetensors).
Errors are raised; aimv2/cli.py reports them as one line."""
from __future__ import annotations

import json
import math

from aimv2.errors import ConfigError


def _floats(s: str) -> list[float]:
    try:
        vals = [float(v) for v in s.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--lrs: expected comma-separated floats, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise ConfigError(f"--lrs: expected positive floats, got {s!r}")
    return vals


def cmd_probe(args) -> int:
    from aimv2.eval.probe import run_probe

    if args.checkpoint is None and not (args.random_init and args.preset):
        raise ConfigError("aimv2 probe: --checkpoint is required (or --random-init with --preset)")
    res = run_probe(args.checkpoint, train_shards=args.train, val_shards=args.val,
                    label_key=args.label_key, random_init=args.random_init, preset=args.preset,
                    lrs=_floats(args.lrs), epochs=args.epochs, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, holdout=args.holdout,
                    extract_batch_size=args.extract_batch_size, num_workers=args.num_workers,
                    device=args.device, seed=args.seed, feature_cache=args.feature_cache,
                    progress=not args.no_progress)
    if args.json:
        print(json.dumps({**res, "per_lr": {str(k): v for k, v in res["per_lr"].items()}}))
    what = "random-init encoder" if args.random_init else "encoder"
    print(f"probe of {what} {res['encoder']}: {res['num_classes']} classes, {res['num_train']} train / "
          f"{res['num_holdout']} held out / {res['num_val']} val images")
    for lr, r in res["per_lr"].items():
        sel = "" if math.isnan(r["select_top1"]) else f"  ({res['selected_on']} {r['select_top1']:.2f})"
        mark = "  <- picked" if lr == res["best_lr"] and len(res["per_lr"]) > 1 else ""
        print(f"  lr {lr:.1e}: val top-1 {r['val_top1']:.2f}{sel}{mark}")
    print(f"top-1: {res['top1']:.2f}")
    return 0


def cmd_embed(args) -> int:
    import torch

    from aimv2.eval.embed import embed

    res = embed(args.checkpoint, data=args.data, out=args.out, pool=args.pool, batch_size=args.batch_size,
                num_workers=args.num_workers, device=args.device, preset=args.preset,
                img_size=args.img_size, dtype=getattr(torch, args.dtype), progress=not args.no_progress,
                native=args.native, max_patches=args.max_patches)
    print(f"embedded {res['num_images']} image(s) ({', '.join(res['keys'])}) -> {res['out']}; "
          f"skipped {res['num_skipped']} unreadable")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="attentive-probe top-1 of a frozen encoder (method.md §6)")
    p.add_argument("--checkpoint", help="weights file, HF / Apple-hub dir, or training run dir / checkpoint")
    p.add_argument("--train", required=True, help="train shards (dir, glob, brace pattern or list)")
    p.add_argument("--val", required=True, help="validation shards")
    p.add_argument("--label-key", default="label", help="integer class field of the samples' JSON")
    p.add_argument("--random-init", action="store_true",
                   help="probe a randomly initialised encoder of the checkpoint's config (the baseline)")
    p.add_argument("--preset", default=None, help="architecture when the checkpoint carries no config")
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="learning-rate grid, trained side by side")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="probe training batch")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of train held out to pick the learning rate")
    p.add_argument("--extract-batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-cache", default=None, help="directory caching the extracted features")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)

    e = subparsers.add_parser("embed", help="encoder features of an image folder or shards -> safetensors")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="folder of images (jpg/png/...) or webdataset shards")
    e.add_argument("--out", required=True, help="output .safetensors file")
    e.add_argument("--pool", default="mean", choices=("mean", "none", "both"),
                   help="mean-pooled (M, D), per-patch (M, N, D), or both")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--num-workers", type=int, default=2)
    e.add_argument("--device", default=None)
    e.add_argument("--preset", default=None)
    e.add_argument("--img-size", type=int, default=None, help="resolution (position embedding interpolated)")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    e.add_argument("--native", action="store_true",
                   help="native resolution: each image at its own aspect ratio (sides multiples of 14, no "
                        "crop), packed --batch-size at a time; per-patch output is packed (method.md §8)")
    e.add_argument("--max-patches", type=int, default=4096,
                   help="with --native: at most this many patches per image (downscaled to fit)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_embed)
