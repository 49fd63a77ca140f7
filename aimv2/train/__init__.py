"""aimv2.train: the AIMv2 pre-training loop (torch.compile per block, checkpoints, metrics, DDP / FSDP2).

Python API
----------
    from aimv2.train import TrainConfig, train

    cfg = TrainConfig.from_preset("aimv2-tiny", run={"out": "runs/tiny", "steps": 300},
                                  data={"batch_size": 32}, optim={"lr": 1e-3})
    cfg = cfg.merge({"run.log_every": 10})                       # dotted keys work too
    cfg = cfg.set(["optim.grad_accum=2"])                        # CLI-style key=value strings
    res = train(cfg)                                             # -> TrainResult
    res = train(cfg, callbacks=[MyCallback()])                   # aimv2.train.Callback hooks
    res.checkpoint, res.metrics, res.plots, res.loss, res.images_per_s

    TrainConfig.from_yaml("run.yaml") / TrainConfig.from_dict({...}) / cfg.to_yaml(path)
    aimv2.train.plot_run("runs/tiny")                            # plots/losses.png, plots/throughput.png
    aimv2.weights.load_encoder("runs/tiny")                      # encoder of the newest checkpoint

Sections (aimv2/train/config.py): model (ModelConfig of the preset), data (shards, global
batch_size, source, ...), optim (lr, warm-up, cosine, weight decay, clipping, grad_accum), run
(steps, out, log_every, ckpt_every, keep_ckpts, resume, device, precision, compile, kernels,
distributed, max_bad_steps, max_minutes, ...). With data.shards unset, the embedded synthetic
dataset is used. A run directory that holds checkpoints is only continued with run.resume=true.

Command line
------------
    aimv2 train --preset aimv2-tiny --out runs/tiny --steps 300 --batch-size 32
    aimv2 train --preset aimv2-large --config my.yaml --set optim.warmup_steps=2000 --data '/d/{000..099}.tar'
    aimv2 train --out runs/tiny --resume                     # continue from the newest whole checkpoint
    aimv2 train --preset aimv2-large --native --max-patches 1024 --tokens-per-batch 16384 --init runs/l224
                                        # native resolution (method.md §8): packed images, from a 224 px run
    torchrun --nproc-per-node 8 -m aimv2.cli train --preset aimv2-large --set run.distributed=fsdp ...
    aimv2 plot runs/tiny

Run directory: config.yaml (resolved), metrics.jsonl (fields in aimv2/train/metrics.py),
checkpoints/step_XXXXXXXX/{model.safetensors, train_state.pt, config.yaml}, plots/*.png,
tensorboard/ (when TensorBoard is installed).
"""
from .callbacks import Callback
from .config import DataSection, OptimConfig, RunConfig, TrainConfig

__all__ = ["TrainConfig", "DataSection", "OptimConfig", "RunConfig", "train", "TrainResult",
           "NonFiniteLossError", "plot_run", "Callback"]


def __getattr__(name):          # lazy: importing the config does not import the model / loop
    if name in ("train", "TrainResult", "NonFiniteLossError"):
        from . import trainer
        return getattr(trainer, name)
    if name == "plot_run":
        from .plot import plot_run
        return plot_run
    raise AttributeError(f"module 'aimv2.train' has no attribute {name!r}")
