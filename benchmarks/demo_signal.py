"""Which demo recipe and probe label separate a pre-trained aimv2 encoder from a random one (issue 19).

Not a pytest benchmark (no `bench_` prefix): a script. For each recipe (image size, text length, steps,
batch, LR) it pre-trains the tiny model on the embedded dataset through the public `aimv2.train.train`,
then reads, for the trained and for a random-init model of the same config:
  - attentive-probe top-1 on several candidate labels computed from the samples' JSON metadata
    (the same features, one probe per label, one LR);
  - the content-word next-token readout (aimv2.eval.readout), true vs shuffled image.
Rows go to --out (a JSON list), appended the moment each is measured.

Learning does not depend on the device when the arithmetic is the same, so the sweep may run on a GPU
with fp32, eager, torch kernels (`run.precision=fp32`, `run.compile=false`, `run.kernels=model`): the
CPU demo's recipe, only faster. Wall-clock cost on the 2-core CPU is measured separately.

    python benchmarks/demo_signal.py --out results.json --device cuda --recipes 112:77:600:32:1e-3 ...
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tarfile
import time

import torch

from aimv2.data.synth import COLOURS, KINDS, SIZES, TEXTURES, layout_code, scene_code


def _meta(shards: str) -> dict[int, dict]:
    from aimv2.data.shards import resolve_shards
    out = {}
    for path in resolve_shards(shards):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    d = json.loads(tar.extractfile(m).read())
                    out[int(d["index"])] = d
    return out


def _index(names, key):
    """fn(meta) -> the main shape's `key` as an index into names."""
    return lambda d: list(names).index(d["shapes"][0][key])


LABELS = {  # name -> (classes, fn(meta) -> int); codes as aimv2.data.synth defines them
    "kind_colour": (48, lambda d: d.get("kind_colour", d["label"])),       # the JSON "label" before v2
    "kind": (6, _index(KINDS, "kind")),
    "colour": (8, _index(COLOURS, "colour")),
    "count": (3, lambda d: d["num_shapes"] - 1),
    "texture": (3, _index(TEXTURES, "texture")),
    "size": (3, _index(SIZES, "size")),
    "relation": (5, lambda d: layout_code(d["shapes"]) % 5),              # 0 alone, 1 + RELATIONS index
    "quadrant": (4, lambda d: 2 * (d["shapes"][0]["y"] >= 0.5) + (d["shapes"][0]["x"] >= 0.5)),
    "kind_count": (18, lambda d: 3 * _index(KINDS, "kind")(d) + d["num_shapes"] - 1),
    "count_size": (9, lambda d: 3 * (d["num_shapes"] - 1) + _index(SIZES, "size")(d)),
    # how many shapes, the main one's size, where it is relative to the second, as the caption states it
    # (19 of the 45 codes occur); the demo's target at synth VERSION 3, named "scene" in the rows of then
    "layout": (45, lambda d: layout_code(d["shapes"])),
    "layout_texture": (135, lambda d: 3 * layout_code(d["shapes"]) + _index(TEXTURES, "texture")(d)),
    # how many shapes, the main one's size and texture (21 of 27 codes occur): the synth JSON's `scene`
    "scene": (27, lambda d: scene_code(d["shapes"])),
}


def _features(enc, shards, split, device, workers):
    from aimv2.eval.probe import _shard_features
    feats, idx = _shard_features(enc, shards, split, "index", 128, workers, device, False)
    return feats, idx


def probe_all(enc, train_shards, val_shards, metas, labels, device, epochs, workers, lr):
    from aimv2.eval.probe import predict, top1, train_probes
    tr_x, tr_i = _features(enc, train_shards, "train", device, workers)
    va_x, va_i = _features(enc, val_shards, "val", device, workers)
    out = {}
    for name in labels:
        classes, fn = LABELS[name]
        tr_y = torch.tensor([fn(metas[0][int(i)]) for i in tr_i])
        va_y = torch.tensor([fn(metas[1][int(i)]) for i in va_i])
        probe = train_probes(tr_x, tr_y.to(tr_x.device), classes, [lr], epochs=epochs, device=device,
                             progress=False)
        pred = predict(probe, va_x)
        out[name] = {"top1": top1(pred[0], va_y), "chance_majority": float(
            100.0 * torch.bincount(va_y, minlength=classes).max() / va_y.numel())}
    return out


def _mutate(name: str | None):
    """Negative controls, patched in for one recipe (training and its readouts); returns the undo.
    noshift: the pixel loss compares output i with patch i (the target leaks into the input);
    zeroenc: the decoder gets zeros instead of the encoder's tokens."""
    import aimv2.kernels as K
    from aimv2.model import AIMv2Decoder
    if name is None:
        return lambda: None
    if name == "noshift":
        orig = K.patch_l2_loss_ref

        def unshifted(pixels, images, plen, patch_size, eps):    # output i+1 scored against patch i+1
            return orig(torch.cat([pixels[:, 1:], pixels[:, -1:]], 1), images, plen, patch_size, eps)
        K.patch_l2_loss_ref = unshifted
        return lambda: setattr(K, "patch_l2_loss_ref", orig)
    if name == "zeroenc":
        orig = AIMv2Decoder.forward
        AIMv2Decoder.forward = lambda self, enc, text: orig(self, torch.zeros_like(enc), text)
        return lambda: setattr(AIMv2Decoder, "forward", orig)
    raise ValueError(f"mutation: unknown {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="/tmp/aimv2-demo-signal-data")
    ap.add_argument("--num", type=int, default=20000)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--recipes", nargs="+", required=True,
                    help="size:text_len:steps:batch:lr[:warmup_frac] (e.g. 112:32:600:32:1e-3)")
    ap.add_argument("--labels", default=",".join(LABELS))
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--probe-lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a training config override for every recipe, parsed as `aimv2 train --set` does (applied "
                         "last, so it wins over the recipe), e.g. data.crop_scale=[0.8,1.0]")
    args = ap.parse_args()

    from aimv2.data.synth import default_dataset
    from aimv2.eval.probe import random_encoder_like
    from aimv2.eval.readout import load_pretrainer, run_readout
    from aimv2.model import AIMv2Pretrainer
    from aimv2.train import TrainConfig, train
    from aimv2.weights import load_encoder

    labels = args.labels.split(",")
    rows = []
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    base = {"date": time.strftime("%Y-%m-%d"), "git_sha": sha, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "command": "python benchmarks/demo_signal.py " + " ".join(os.sys.argv[1:])}

    def emit(row):
        rows.append({**base, **row})
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(json.dumps(row), flush=True)

    data, random_done = {}, {}
    for spec in args.recipes:
        size, text_len, steps, batch, lr, *rest = spec.split(":")
        only_random = int(steps) == 0          # steps 0: the random-init rows of this size only
        size, text_len, steps, batch, lr = int(size), int(text_len), int(steps), int(batch), float(lr)
        warm = float(rest[0]) if rest else 0.05
        mutation = rest[1] if len(rest) > 1 else None
        if size not in data:
            t0 = time.time()
            tr = default_dataset(os.path.join(args.data, f"train-{size}"), num=args.num, size=size, seed=0,
                                 progress=False)
            va = default_dataset(os.path.join(args.data, f"val-{size}"), num=args.val, size=size, seed=1,
                                 progress=False)
            data[size] = (tr, va, (_meta(tr), _meta(va)))
            emit({"what": "data", "size": size, "seconds": time.time() - t0})
        tr, va, metas = data[size]
        if only_random:
            from aimv2.model import AIMv2Encoder
            from aimv2.presets import get_preset
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                rnd_enc = AIMv2Encoder(get_preset("aimv2-tiny", img_size=size)).to(args.device).eval()
            emit({"what": "random", "size": size, "probe": probe_all(
                rnd_enc, tr, va, metas, labels, args.device, args.probe_epochs, args.workers, args.probe_lr)})
            continue
        tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in "_".join([spec, *args.set]))
        out = os.path.join(args.data, "runs", tag)     # a run per recipe and overrides
        cfg = TrainConfig.from_preset("aimv2-tiny", **{
            "model.img_size": size, "model.text_len": text_len,
            "data.shards": tr, "data.batch_size": batch, "data.num_workers": args.workers,
            "run.out": out, "run.steps": steps, "run.log_every": max(1, steps // 20), "run.ckpt_every": 0,
            "run.progress": False, "run.device": args.device, "run.precision": "fp32", "run.compile": False,
            "run.kernels": "model", "run.plot": False, "run.tensorboard": False,
            "data.hflip": False,                          # as `aimv2 demo`: the captions name left and right
            "optim.lr": lr, "optim.warmup_steps": max(1, int(warm * steps))}).set(args.set)   # --set wins
        undo = _mutate(mutation)
        t0 = time.time()
        res = train(cfg)
        t_train = time.time() - t0
        curve = [json.loads(x) for x in open(res.metrics)]
        enc = load_encoder(str(res.run_dir)).to(args.device)
        t0 = time.time()
        probes = probe_all(enc, tr, va, metas, labels, args.device, args.probe_epochs, args.workers, args.probe_lr)
        model = load_pretrainer(str(res.run_dir), args.device)
        ro = run_readout(model, va, num_workers=args.workers)
        undo()
        emit({"what": "trained", "recipe": spec, "mutation": mutation, "size": size, "text_len": text_len, "steps": steps, "batch": batch,
              "lr": cfg.optim.lr, "set": args.set, "train_s": t_train, "eval_s": time.time() - t0, "loss": res.loss,
              "pixel_loss": res.pixel_loss, "text_loss": res.text_loss,
              "curve": [(r["step"], round(r["loss"], 4)) for r in curve if r.get("loss") is not None],
              "probe": probes, "readout": ro})
        key = (size, text_len)
        if mutation:
            continue
        if key not in random_done:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                rnd_model = AIMv2Pretrainer(model.cfg).to(args.device).eval()
            rnd_enc = random_encoder_like(enc, 0)
            random_done[key] = True
            emit({"what": "random", "size": size, "text_len": text_len,
                  "probe": probe_all(rnd_enc, tr, va, metas, labels, args.device, args.probe_epochs, args.workers,
                                     args.probe_lr),
                  "readout": run_readout(rnd_model, va, num_workers=args.workers)})


if __name__ == "__main__":
    main()
