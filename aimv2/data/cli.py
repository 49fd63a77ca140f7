"""`aimv2 data ...`: synth (write the embedded dataset), index (shard indexes), inspect (counts + contact sheet).

    aimv2 data synth --out DIR [--num N --size PX --seed S --shard-size K --workers W]
    aimv2 data index SHARDS [--dali]          # our index cache, plus DALI wds2idx files with --dali
    aimv2 data inspect SHARDS [--sheet out.png --n 16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from aimv2.errors import run_command

__all__ = ["register", "main"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `data` command (with subcommands synth / index / inspect) to an argparse subparsers object."""
    p = subparsers.add_parser("data", help="datasets: synthesise, index, inspect webdataset shards")
    sub = p.add_subparsers(dest="data_cmd", required=True)

    s = sub.add_parser("synth", help="write the procedural image-caption dataset as webdataset shards")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, default=20000, help="number of images (default 20000)")
    s.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(data_func=_synth)

    i = sub.add_parser("index", help="build (cached) shard indexes; --dali also writes wds2idx .idx files")
    i.add_argument("shards", nargs="+", help="shard files, directories or brace patterns")
    i.add_argument("--dali", action="store_true", help="also write <shard>.idx in DALI's v1.2 format")
    i.add_argument("--index-dir", default=None, help="cache directory when the shard directory is read-only")
    i.set_defaults(data_func=_index)

    n = sub.add_parser("inspect", help="sample counts, skip reasons and a contact sheet PNG")
    n.add_argument("shards", nargs="+")
    n.add_argument("--sheet", default=None, help="write a contact sheet of the first --n samples here")
    n.add_argument("--n", type=int, default=16)
    n.add_argument("--size", type=int, default=160, help="thumbnail side in the sheet")
    n.set_defaults(data_func=_inspect)
    p.set_defaults(func=lambda args: args.data_func(args))
    return p


def _synth(args) -> int:
    from .synth import shard_pattern, write_synthetic_dataset

    paths = write_synthetic_dataset(args.out, num=args.num, size=args.size, seed=args.seed,
                                    shard_size=args.shard_size, progress=not args.no_progress, workers=args.workers)
    print(f"wrote {args.num} samples in {len(paths)} shards: {shard_pattern(os.path.abspath(args.out), len(paths))}")
    return 0


def _index(args) -> int:
    from .shards import load_index, resolve_shards, write_dali_index

    total = damaged = 0
    for path in resolve_shards(args.shards):
        idx = load_index(path, args.index_dir)
        total += len(idx.keys)
        damaged += len(idx.damaged)
        if args.dali:
            write_dali_index(idx, os.path.splitext(path)[0] + ".idx")
        notes = (["truncated"] if idx.truncated else []) + [
            f"{reason} at offset {off} ({n} bytes skipped)" for off, n, reason, _ in idx.damaged]
        print(f"{path}: {len(idx.keys)} samples" + (f" ({'; '.join(notes)})" if notes else ""))
    print(f"total: {total} samples" + (f", {damaged} damaged region(s) skipped" if damaged else ""))
    return 0


def _inspect(args) -> int:
    import io
    import textwrap

    from PIL import Image, ImageDraw

    from .config import DataConfig
    from .dataset import SampleReader, SampleTable
    from .loader import to_rgb
    from .shards import resolve_shards

    paths = resolve_shards(args.shards)
    table = SampleTable.build(paths)
    reader = SampleReader(table, DataConfig(shards=paths))
    counts: dict[str, int] = {"samples": table.num_samples, "truncated_shards": len(table.truncated)}
    if table.dropped:
        counts["skipped_truncated_shard"] = table.dropped
    for reason, n in sorted(table.damaged.items()):
        counts["skipped_" + reason] = n
    thumbs, usable = [], 0
    for sid in range(table.num_samples):
        rec = reader.read(sid)
        if isinstance(rec, str):
            counts["skipped_" + rec] = counts.get("skipped_" + rec, 0) + 1
            continue
        usable += 1
        if args.sheet and len(thumbs) < args.n:
            try:
                im = to_rgb(Image.open(io.BytesIO(rec.image)))
            except Exception:
                counts["skipped_corrupt_image"] = counts.get("skipped_corrupt_image", 0) + 1
                continue
            im.thumbnail((args.size, args.size))
            thumbs.append((im, rec.caption))
    print(json.dumps({"shards": len(paths), **counts}, indent=1))
    if args.sheet and thumbs:
        cols = min(4, len(thumbs))
        rows = -(-len(thumbs) // cols)
        cell_w, cell_h = args.size, args.size + 56
        sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        for k, (im, cap) in enumerate(thumbs):
            x, y = (k % cols) * cell_w, (k // cols) * cell_h
            sheet.paste(im, (x, y))
            lines = textwrap.wrap(cap, 26)
            draw.multiline_text((x + 2, y + args.size + 2), "\n".join(lines[:4]), fill="black")
        sheet.save(args.sheet)
        print(f"contact sheet: {args.sheet}")
    if not usable:                 # the counts above say why; a script must not read this as success
        from aimv2.errors import RunError
        why = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "samples" and v) or "no members"
        raise RunError(f"data inspect: no usable sample in {len(paths)} shard(s) ({why}); "
                       f"are they webdataset .tar files?")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point: `python -m aimv2.data.cli synth --out DIR`."""
    from aimv2.cli import ArgumentParser

    parser = ArgumentParser(prog="aimv2")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["data"] + list(argv if argv is not None else sys.argv[1:]))
    return run_command(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
