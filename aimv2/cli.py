"""The `aimv2` command line: `aimv2 <command> [...]`; `aimv2 --help` lists the commands.

Commands are registered by their own packages (`register(subparsers)` in aimv2/data/cli.py,
aimv2/train/cli.py, aimv2/eval/cli.py); `info` lives here.

Errors: commands raise, and `main` reports every exception in one place (aimv2/errors.py): one line
`error: ...` on stderr, exit code 2 for a config error and 1 for a runtime error; `--debug` (before or
after the command) or AIMV2_DEBUG=1 also prints the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from aimv2 import errors

_COMMAND_MODULES = ("aimv2.data.cli", "aimv2.train.cli", "aimv2.eval.cli", "aimv2.demo")


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:,.1f} GFLOP"


def cmd_info(args) -> int:
    import torch

    from aimv2.model import AIMv2Decoder, AIMv2Encoder, count_params, flops_per_sample, forward_flops
    from aimv2.presets import get_preset

    overrides = {}
    if args.img_size:
        overrides["img_size"] = args.img_size
    cfg = get_preset(args.preset, **overrides)
    with torch.device("meta"):
        n_enc = count_params(AIMv2Encoder(cfg))
        n_dec = count_params(AIMv2Decoder(cfg))
    fwd = forward_flops(cfg, "random")
    inf = forward_flops(cfg, "none")
    info = {
        "config": cfg.to_dict(),
        "num_patches": cfg.num_patches,
        "params_encoder": n_enc,
        "params_decoder_and_heads": n_dec,
        "params_total": n_enc + n_dec,
        "train_forward_flops_per_image": fwd["total"],
        "train_backward_flops_per_image": 2 * fwd["total"],
        "train_flops_per_image": flops_per_sample(cfg),
        "train_forward_flops_breakdown": {k: v for k, v in fwd.items() if k != "total"},
        "inference_encoder_forward_flops_per_image": inf["patch_embed"] + inf["encoder"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"preset {cfg.name}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<20} {v}")
    print(f"patches per image      {cfg.num_patches}")
    print(f"parameters: encoder    {n_enc:,}")
    print(f"            decoder    {n_dec:,}  (incl. heads and embeddings; training only)")
    print(f"            total      {n_enc + n_dec:,}")
    print(f"FLOPs per image (training, random prefix, unmasked attention work only):")
    print(f"  forward   {_fmt_flops(fwd['total'])}")
    print(f"  backward  {_fmt_flops(2 * fwd['total'])}")
    print(f"  total     {_fmt_flops(flops_per_sample(cfg))}")
    print(f"FLOPs per image (inference, encoder only, bidirectional): "
          f"{_fmt_flops(inf['patch_embed'] + inf['encoder'])}")
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line too (exit 2), pointing at --help."""

    def error(self, message: str):
        self.exit(errors.EXIT_CONFIG, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from aimv2 import __version__
    from aimv2.presets import list_presets

    parser = ArgumentParser(prog="aimv2", description="AIMv2 pre-training, kernels and serving")
    parser.add_argument("--version", action="version", version=f"aimv2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="print a preset's config, parameter count and FLOPs per image")
    p.add_argument("--preset", default="aimv2-large", choices=list_presets())
    p.add_argument("--img-size", type=int, default=None, help="override the image size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error as well")
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Accept --debug after any (sub)command too: `aimv2 train ... --debug`. SUPPRESS as the default,
    so a subcommand without the flag does not reset one given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="print the traceback of an error as well")
                _add_debug_flag(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return errors.run_command(args.func, args, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
