"""`aimv2 train` and `aimv2 plot` (registered into aimv2/cli.py by `register(subparsers)`).

Config resolution (later wins): --preset | --config FILE.yaml | <out>/config.yaml (with --resume and
neither of the first two), then the everyday flags, then every --set section.key=value.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# everyday flag -> config key
FLAG_KEYS = {"steps": "run.steps", "batch_size": "data.batch_size", "lr": "optim.lr",
             "log_every": "run.log_every", "ckpt_every": "run.ckpt_every", "out": "run.out",
             "data": "data.shards", "grad_accum": "optim.grad_accum", "device": "run.device",
             "compile": "run.compile", "max_minutes": "run.max_minutes", "init": "run.init",
             "min_patches": "data.min_patches", "max_patches": "data.max_patches",
             "tokens_per_batch": "data.tokens_per_batch", "float8": "run.float8"}


def _resume_value(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {text!r}")
    return text


def build_config(args):
    from aimv2.errors import ConfigError

    from .config import TrainConfig, load_yaml

    if args.config:
        d = load_yaml(args.config)
        preset = args.preset or d.pop("preset", None)
        d.pop("preset", None)
        cfg = (TrainConfig.from_preset(preset) if preset else TrainConfig()).merge(d)
    elif args.preset:
        cfg = TrainConfig.from_preset(args.preset)
    elif args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        cfg = TrainConfig.from_yaml(Path(args.out) / "config.yaml")
    else:
        raise ConfigError("aimv2 train: pass --preset NAME or --config FILE.yaml "
                          "(or --resume --out RUN_DIR of an existing run)")
    over = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None}
    if args.resume:
        over["run.resume"] = args.resume                   # True or "auto"
    if args.no_progress:
        over["run.progress"] = False
    if args.native:
        over["model.native"] = over["data.native"] = True
    return cfg.merge(over).set(args.set or [])


def cmd_train(args, callbacks=()) -> int:
    """`aimv2 train`; `callbacks` (aimv2.train.callbacks.Callback) for a caller that wraps the command.
    Errors are raised (aimv2/cli.py reports them)."""
    from .trainer import train

    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    res = train(cfg, callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"step {res.step}" + (f" (stopped by {res.stopped_by})" if res.stopped_by else "")
          + (f"  loss {res.loss:.4f}" if res.loss is not None else ""))
    print(f"checkpoint  {res.checkpoint}")
    print(f"metrics     {res.metrics}")
    for p in res.plots:
        print(f"plot        {p}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    for p in plot_run(args.run_dir):
        print(p)
    return 0


def register(subparsers) -> None:
    from aimv2.presets import list_presets

    from .config import FLOAT8

    p = subparsers.add_parser("train", help="pre-train an AIMv2 encoder (torch.compile, DDP/FSDP2 under torchrun)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list_presets(), help="model preset (the base config)")
    p.add_argument("--config", help="YAML file with model/data/optim/run sections (optional 'preset:')")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config key, e.g. --set optim.warmup_steps=500 (repeatable)")
    p.add_argument("--data", help="training shards (pattern or dir); default: the embedded synthetic dataset")
    p.add_argument("--out", help="run directory (default runs/aimv2)")
    p.add_argument("--resume", nargs="?", const=True, default=None, type=_resume_value, metavar="auto",
                   help="continue from the newest whole checkpoint in --out (an error when there is none); "
                        "--resume auto: continue if there is one, else start: the one command for torchrun "
                        "--max-restarts (every restart resumes)")
    p.add_argument("--steps", type=int, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, help="global batch size per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--log-every", type=int, help="steps between metrics rows")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (<= 0: only at the end)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-minutes", type=float, help="wall-clock budget: checkpoint and stop when reached")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every block (default: on for a GPU, off for a CPU)")
    p.add_argument("--float8", choices=FLOAT8, metavar="MODE",
                   help="off | tensorwise | rowwise: the encoder's and decoder's linears as torchao float8 "
                        "GEMMs (run.float8; a CUDA GPU of sm_89+ and torchao: pip install 'aimv2[fp8]'; docs/fp8.md)")
    p.add_argument("--native", action="store_true",
                   help="native resolution (method.md §8): images at their own size packed by tokens "
                        "(model.native and data.native)")
    p.add_argument("--min-patches", type=int, help="native: fewest patches one image gets (data.min_patches)")
    p.add_argument("--max-patches", type=int, help="native: most patches one image gets (data.max_patches)")
    p.add_argument("--tokens-per-batch", type=int,
                   help="native: patches per packed micro-batch on each rank (data.tokens_per_batch)")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from these weights (fine-tuning): a training checkpoint or run dir, or "
                        "released encoder weights (the decoder then starts fresh)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    q = subparsers.add_parser("plot", help="write PNG loss / throughput plots of a run directory")
    q.add_argument("run_dir", help="run directory holding metrics.jsonl")
    q.set_defaults(func=cmd_plot)
