"""Attentive probe on a frozen AIMv2 trunk (method.md §6).

Features: the encoder's last-layer output, fully bidirectional, tokens x (B, N, D). The probe:

    x_hat = BatchNorm1d(D, affine=False, eps=1e-6)(x)          per channel over (B, N)
    k, v  = x_hat W_k, x_hat W_v                                no biases, H heads of D/H
    o_h   = softmax(q_h k_h^T / sqrt(D/H)) v_h                  one learned query q (1, D), no q projection
    logits = Linear(D -> classes)(concat_h o_h)

Heads rule: H = D // 128 (head dim 128, as in the trunk); for D < 128 H = 1; when 128 does not divide D,
H is the largest divisor of D not above max(1, D // 128), so the head dim is >= 128.

Protocol (`run_probe`): features of the train and val shards are extracted once with the frozen encoder
(in memory, optionally cached on disk), then one probe per learning rate of a small grid is trained side
by side in the same passes over the features (AdamW, linear warm-up then cosine to 0). When the grid has
more than one rate, a seeded `holdout` fraction of train is held out and the rate is picked on it; the
reported top-1 is the picked probe's accuracy on val (val top-1 of every rate is reported too, but picking
on it would be optimistic). `random_init=True` probes a randomly initialised encoder of the same config
(fixed seed): the baseline a probe number is read against.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from aimv2.train.optim import WarmupCosine

log = logging.getLogger(__name__)

DEFAULT_LRS = (3e-4, 1e-3, 3e-3)


# ----------------------------------------------------------------------------- the probe
def probe_heads(dim: int) -> int:
    """Heads of the probe for width `dim`: D // 128, at least 1, lowered until it divides D."""
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    h = max(1, dim // 128)
    while dim % h:
        h -= 1
    return h


class AttentiveProbe(nn.Module):
    """forward(tokens (B, N, D)) -> logits (B, classes). See the module docstring for the math."""

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2, got {num_classes}")
        self.num_heads = probe_heads(dim) if num_heads is None else num_heads
        if dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide dim {dim}")
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Equivalent PyTorch (the spec form, K and V of every token):
            k, v = self.k(x).view(B, N, H, Dh), self.v(x).view(B, N, H, Dh); q = self.query.view(H, Dh)
            o = sdpa(q, k, v) -> (B, D); logits = self.head(o)
        computed re-associated, so the K / V projections act on D-vectors instead of the N tokens:
            s[b,h,n] = x[b,n] . (W_k,h^T q_h) / sqrt(Dh),  o[b,h] = W_v,h (sum_n softmax_n(s)[b,h,n] x[b,n])
        NOTE: 2 B N D H + 2 B H D Dh multiply-adds instead of 4 B N D^2: D / H = 128x fewer for AIMv2 sizes
        (2-core CPU, aimv2-tiny features (128, 64, 128): 0.6 s -> ~10 ms per step, fwd + bwd)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.query.shape[-1]:
            raise ValueError(f"tokens: expected shape (B, N, {self.query.shape[-1]}), got {tuple(tokens.shape)}")
        B, N, D = tokens.shape
        return self.classify(self.norm(tokens.reshape(B * N, D)).view(B, N, D))   # BN per channel over (B, N)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) from batch-normalised tokens x (B, N, D): the probe after its BatchNorm."""
        B, N, D = x.shape
        H = self.num_heads
        Dh = D // H
        w_k = self.k.weight.view(H, Dh, D)                                   # (H, Dh, D): rows of head h
        w_v = self.v.weight.view(H, Dh, D)                                   # (H, Dh, D)
        u = torch.einsum("hd,hde->he", self.query.view(H, Dh), w_k)          # (H, D) = W_k,h^T q_h
        a = torch.einsum("bne,he->bhn", x, u).mul(Dh ** -0.5).softmax(-1)    # (B, H, N)
        pooled = torch.einsum("bhn,bne->bhe", a, x)                          # (B, H, D)
        o = torch.einsum("bhe,hde->bhd", pooled, w_v).reshape(B, D)          # (B, D), heads concatenated
        return self.head(o)                                                  # (B, classes)


# ----------------------------------------------------------------------------- training
def _batches(index: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    """Batches of the rows `index` (int64, CPU): shuffled with `generator`, in order without one."""
    if generator is not None:
        index = index[torch.randperm(index.numel(), generator=generator)]
    for i in range(0, index.numel(), batch_size):
        yield index[i:i + batch_size]


def _probe_optimizer(probes: nn.ModuleList, lrs: Sequence[float], weight_decay: float, warmup_frac: float,
                     total: int):
    """(AdamW over every probe, each at its own rate; its warm-up + cosine schedule over `total` steps)."""
    groups = []
    for probe, lr in zip(probes, lrs):
        decay = [p for n, p in probe.named_parameters() if p.dim() >= 2 and n != "query"]
        other = [p for n, p in probe.named_parameters() if not (p.dim() >= 2 and n != "query")]
        groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                   {"params": other, "lr": lr, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    warmup = max(1, int(warmup_frac * total))
    # factor (s + 1) / W for s < W, then cosine to 0 at s = total
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(1.0, 0.0, 0.0, warmup, total, warmup_offset=1))
    return opt, sched


def train_probes(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lrs: Sequence[float], *,
                 epochs: int = 30, batch_size: int = 128, weight_decay: float = 0.05,
                 warmup_frac: float = 0.05, device=None, seed: int = 0, index: torch.Tensor | None = None,
                 progress: bool = True) -> list[AttentiveProbe]:
    """Train one `AttentiveProbe` per learning rate on the same shuffled batches.

    feats (M, N, D) any float dtype (cast to fp32 per batch), labels (M,) int64 in [0, num_classes);
    index: the rows to train on (default all; no copy of the features is made).
    AdamW (betas 0.9, 0.999), weight decay on the K/V/classifier weights only, `warmup_frac` of the steps
    of linear warm-up then cosine to 0. The probes share the batches and the (parameter-free) BatchNorm
    pass; their losses are summed, so each gets exactly its own gradient. Returns the probes in eval mode.
    """
    from tqdm.auto import tqdm

    _check_features(feats, labels, "feats")
    if not lrs or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in lrs):
        raise ValueError(f"lrs: expected a non-empty sequence of positive floats, got {lrs!r}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    device = torch.device(device or feats.device)
    D = feats.shape[-1]
    index = torch.arange(feats.shape[0]) if index is None else index.to("cpu", torch.long)
    M = index.numel()
    if M == 0:
        raise ValueError("index: no training rows")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probes = nn.ModuleList(AttentiveProbe(D, num_classes) for _ in lrs).to(device)
    total = epochs * math.ceil(M / batch_size)
    opt, sched = _probe_optimizer(probes, lrs, weight_decay, warmup_frac, total)
    probes.train()
    bar = tqdm(total=total, desc="train probe", unit="step", disable=not progress, leave=False)
    for _ in range(epochs):
        for idx in _batches(index, batch_size, gen):
            x = feats[idx.to(feats.device)].to(device, torch.float32, non_blocking=True)   # (b, N, D)
            y = labels[idx.to(labels.device)].to(device, non_blocking=True)
            # the BatchNorm has no parameters and sees the same batch in every probe: normalise once
            xn = probes[0].norm(x.flatten(0, 1)).view_as(x)                      # (b, N, D)
            loss = sum(F.cross_entropy(p.classify(xn), y) for p in probes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if bar.n % 20 == 0 or bar.n == total:
                bar.set_postfix(loss=f"{loss.item() / len(probes):.3f}")
    bar.close()
    for p in probes[1:]:                            # the running statistics the shared norm gathered
        p.norm.load_state_dict(probes[0].norm.state_dict())
    return list(probes.eval())


@torch.no_grad()
def predict(probes: Sequence[AttentiveProbe], feats: torch.Tensor, batch_size: int = 256,
            device=None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Arg-max predictions of each probe for the rows `index` (default all): (len(probes), M) int64, CPU."""
    device = torch.device(device or next(probes[0].parameters()).device)
    index = torch.arange(feats.shape[0]) if index is None else index.to("cpu", torch.long)
    out = []
    for idx in _batches(index, batch_size, None):
        x = feats[idx.to(feats.device)].to(device, torch.float32)
        out.append(torch.stack([p.eval()(x).argmax(-1) for p in probes]).cpu())
    return torch.cat(out, dim=1) if out else torch.empty(len(probes), 0, dtype=torch.long)


def top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (pred (..., M) vs labels (M,)); NaN for M = 0."""
    if labels.numel() == 0:
        return float("nan")
    return float((pred == labels.to(pred.device)).double().mean(-1).mul(100.0).item())


# ----------------------------------------------------------------------------- features
def _check_features(feats, labels, name):
    if not isinstance(feats, torch.Tensor) or feats.dim() != 3 or not feats.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor (M, N, D), got "
                         f"{tuple(getattr(feats, 'shape', ()))} {getattr(feats, 'dtype', type(feats).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != feats.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels: expected an int64 tensor ({feats.shape[0]},), got "
                         f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', None)}")


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[dict], *, desc: str = "features",
                     label_key: str | None = "label", store_dtype=torch.float16, store_device="cpu",
                     progress: bool = True, total: int | None = None):
    """Run the frozen encoder (fully bidirectional) over `batches` of {"images": (B, 3, S, S), "labels": (B,)}.

    Returns (feats (M, N, D) in `store_dtype` on `store_device`, labels (M,) int64 or None when
    label_key is None). fp16 storage halves memory; features are RMS-normalised (|x| ~ 1 * norm weight),
    well inside fp16's range.
    """
    from tqdm.auto import tqdm

    p = next(encoder.parameters())
    encoder.eval()
    feats, labels = [], []
    bar = tqdm(batches, desc=desc, unit="batch", total=total, disable=not progress, leave=False)
    for batch in bar:
        images = batch["images"]
        if label_key is not None:
            if "labels" not in batch:
                raise ValueError(f"label_key: no labels in the batch: the samples' JSON has no "
                                 f"{label_key!r} field")
            labels.append(torch.as_tensor(batch["labels"]).reshape(-1).long().cpu())
        x = encoder(images.to(p.device, p.dtype, non_blocking=True))       # (B, N, D)
        feats.append(x.to(store_device, store_dtype))
    bar.close()
    if not feats:
        raise ValueError(f"{desc}: no images found (empty shards?)")
    f = torch.cat(feats)                                                    # (M, N, D)
    return f, (torch.cat(labels) if label_key is not None else None)


def _shard_features(encoder, shards, split: str, label_key: str, batch_size: int, num_workers: int,
                    store_device, progress: bool):
    """extract_features over webdataset shards (one deterministic eval pass: resize + center crop)."""
    from aimv2.data import DataConfig, build_loader

    p = next(encoder.parameters())
    cfg = DataConfig(shards=shards, image_size=encoder.cfg.img_size, patch_size=encoder.cfg.patch_size,
                     batch_size=batch_size, num_workers=num_workers, train=False, label_key=label_key,
                     device=str(p.device))
    loader = build_loader(cfg)
    try:
        out = extract_features(encoder, loader, desc=f"{split} features", label_key=label_key,
                               store_device=store_device, progress=progress, total=len(loader))
    except RuntimeError as e:                      # the loader raises when every sample was skipped
        missing = loader.stats().get("skipped_missing_label", 0)
        if missing:
            raise ValueError(f"label_key: {label_key!r} is missing from (or not an integer in) the JSON of "
                             f"all {missing} samples") from e
        raise ValueError(str(e)) from e
    missing = loader.stats().get("skipped_missing_label", 0)
    if missing:
        log.warning("probe: %d %s sample(s) have no integer %r in their JSON and were skipped",
                    missing, split, label_key)
    return out


@torch.no_grad()
def _fingerprint(module: nn.Module) -> str:
    """A hash of the weights (per-tensor sum and sum of squares in fp64): a cache never outlives them."""
    stats = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in module.parameters()])
    return hashlib.sha1(stats.cpu().numpy().tobytes()).hexdigest()[:16]


def _shard_stats(shards) -> list:
    """(path, size, mtime_ns) of every shard file: a cache never outlives the data either (a dataset
    regenerated at the same path, e.g. a new synth VERSION, has other files)."""
    from aimv2.data.shards import resolve_shards
    try:
        stats = [(p, os.stat(p)) for p in resolve_shards(shards)]
    except (OSError, ValueError):
        return []                   # the loader reports missing shards itself
    return [(p, st.st_size, st.st_mtime_ns) for p, st in stats]


def _cached_features(cache_dir, split, identity: dict, compute):
    """(feats, labels) from cache_dir/<split>-<hash of identity>.safetensors when present (identity checked
    in its metadata), else computed and saved there."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, safe_open, save_file

    ident = json.dumps(identity, sort_keys=True, default=str)
    tag = hashlib.sha1(ident.encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"{split}-{tag}.safetensors")        # one file per (encoder, data)
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            same = (f.metadata() or {}).get("identity") == ident
        if same:
            d = load_file(path)
            log.info("probe: loaded cached %s features from %s", split, path)
            return d["feats"], d["labels"]
        log.info("probe: cache %s was made for other inputs; recomputing", path)
    feats, labels = compute()
    os.makedirs(cache_dir, exist_ok=True)
    save_file({"feats": feats.contiguous(), "labels": labels.contiguous()}, path, metadata={"identity": ident})
    return feats, labels


# ----------------------------------------------------------------------------- encoder for the probe
def random_encoder_like(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh `AIMv2Encoder` with encoder's config, initialised (method.md §1 init) from `seed`, same device/dtype."""
    from aimv2.model import AIMv2Encoder

    p = next(encoder.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnd = AIMv2Encoder(encoder.cfg)
    return rnd.to(p.device, p.dtype).eval()


def _probe_encoder(checkpoint, encoder, preset, random_init, device, seed):
    if encoder is None and checkpoint is None and preset is None:
        raise ValueError("run_probe: give a checkpoint, an encoder, or (with random_init) a preset")
    if encoder is not None and checkpoint is not None:
        raise ValueError("run_probe: give either checkpoint or encoder, not both")
    if encoder is None and checkpoint is None:
        if not random_init:
            raise ValueError("run_probe: preset without a checkpoint only makes sense with random_init=True")
        from aimv2.model import AIMv2Encoder
        from aimv2.presets import get_preset
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = AIMv2Encoder(get_preset(preset))
        return _to_inference(encoder, device), f"random:{preset}"
    if encoder is None:
        from aimv2.eval.hub import from_pretrained
        encoder = from_pretrained(checkpoint, device=device, preset=preset)
        name = str(checkpoint)
    else:
        encoder = _to_inference(encoder, device) if device is not None else encoder.eval()
        name = f"encoder:{encoder.cfg.name}"
    if random_init:
        return random_encoder_like(encoder, seed), f"random:{name}"
    return encoder, name


def _to_inference(encoder, device):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return encoder.to(device, dtype).eval()


def _split_features(enc, name: str, fingerprint, split: str, shards, label_key: str, feature_cache,
                    extract_batch_size: int, num_workers: int, store, progress: bool):
    """(feats, labels) of one split, from the feature cache when it holds them for these weights and data."""
    def compute():
        return _shard_features(enc, shards, split, label_key, extract_batch_size, num_workers, store, progress)
    ident = {"encoder": name, "weights": fingerprint, "shards": shards, "label_key": label_key,
             "img_size": enc.cfg.img_size, "files": _shard_stats(shards) if feature_cache else None}
    try:
        return _cached_features(feature_cache, split, ident, compute)
    except ValueError as e:
        raise ValueError(f"{split} shards {shards!r}: {e}") from e


def _num_classes(tr_y: torch.Tensor, va_y: torch.Tensor, label_key: str) -> int:
    """max label + 1 over both splits; ValueError for < 2 train classes or a negative label."""
    classes = torch.unique(tr_y)
    if classes.numel() < 2:
        raise ValueError(f"train shards: a probe needs >= 2 classes under {label_key!r}, "
                         f"found {classes.tolist()}")
    lo = min(int(tr_y.min()), int(va_y.min()))
    if lo < 0:
        raise ValueError(f"{label_key!r}: class labels must be integers >= 0, got {lo}")
    return max(int(tr_y.max()), int(va_y.max())) + 1


def _holdout_split(tr_y: torch.Tensor, n_lrs: int, holdout: float, seed: int):
    """(fit_idx, hold_idx, n_hold): part of train held out to pick the learning rate (seeded, independent
    of the training shuffle); none with one rate, and never a fit set of a single class."""
    M = tr_y.shape[0]
    n_hold = 0
    if n_lrs > 1 and holdout > 0:
        n_hold = min(M - 2, max(1, round(holdout * M))) if M >= 4 else 0
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed + 1))
    fit_idx, hold_idx = perm[n_hold:].sort().values, perm[:n_hold].sort().values
    if torch.unique(tr_y[fit_idx]).numel() < 2:        # tiny sets: never fit on a single class
        fit_idx, hold_idx, n_hold = perm.sort().values, perm[:0], 0
    return fit_idx, hold_idx, n_hold


def _selection_top1(probes, tr_x, tr_y, fit_idx, hold_idx, n_hold: int, n_lrs: int):
    """(top-1 per rate on the split the rate is picked on, that split's name)."""
    if n_hold:
        return [top1(p, tr_y[hold_idx]) for p in predict(probes, tr_x, index=hold_idx)], "holdout"
    if n_lrs > 1:
        return [top1(p, tr_y[fit_idx]) for p in predict(probes, tr_x, index=fit_idx)], "train"
    return [float("nan")], "only"


# ----------------------------------------------------------------------------- the protocol
def run_probe(checkpoint=None, *, encoder: nn.Module | None = None, train_shards, val_shards,
              label_key: str = "label", random_init: bool = False, preset: str | None = None,
              lrs: Sequence[float] = DEFAULT_LRS, epochs: int = 30, batch_size: int = 128,
              weight_decay: float = 0.05, holdout: float = 0.1, extract_batch_size: int = 64,
              num_workers: int = 2, device=None, seed: int = 0, feature_cache: str | None = None,
              progress: bool = True) -> dict:
    """Attentive-probe top-1 of a frozen encoder (see the module docstring for the protocol).

    checkpoint: anything `aimv2.weights.load_encoder` reads (weights file, HF dir, training run dir or
    checkpoint); or pass `encoder` (an AIMv2Encoder). random_init: probe a randomly initialised encoder of
    the same config instead (seed `seed`). train_shards / val_shards: webdataset shards (str, glob, list)
    whose JSON holds an integer class under `label_key`.

    Returns dict(top1 (val, %, picked rate), best_lr, per_lr {lr: {"val_top1", "select_top1"}},
    num_train, num_holdout, num_val, num_classes, majority_top1 (val top-1 of always answering the
    commonest train class, %), selected_on ("holdout" | "train" | "only"), encoder).
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout: expected a fraction in [0, 1), got {holdout}")
    lrs = tuple(float(lr) for lr in (lrs if isinstance(lrs, (list, tuple)) else [lrs]))
    enc, name = _probe_encoder(checkpoint, encoder, preset, random_init, device, seed)
    dev = next(enc.parameters()).device
    store = torch.device("cpu")     # fp16 on the host: M * N * D * 2 bytes; batches move to `dev` to train
    fingerprint = _fingerprint(enc) if feature_cache is not None else None
    def features(split, shards):
        return _split_features(enc, name, fingerprint, split, shards, label_key, feature_cache,
                               extract_batch_size, num_workers, store, progress)
    tr_x, tr_y = features("train", train_shards)
    va_x, va_y = features("val", val_shards)
    num_classes = _num_classes(tr_y, va_y, label_key)
    fit_idx, hold_idx, n_hold = _holdout_split(tr_y, len(lrs), holdout, seed)
    probes = train_probes(tr_x, tr_y, num_classes, lrs, epochs=epochs, batch_size=batch_size,
                          weight_decay=weight_decay, device=dev, seed=seed, index=fit_idx, progress=progress)
    val_acc = [top1(p, va_y) for p in predict(probes, va_x)]               # predictions (L, M_val)
    sel_acc, selected_on = _selection_top1(probes, tr_x, tr_y, fit_idx, hold_idx, n_hold, len(lrs))
    best = max(range(len(lrs)), key=lambda i: (sel_acc[i] if not math.isnan(sel_acc[i]) else -1.0, -i))
    return {
        "top1": val_acc[best],
        "best_lr": lrs[best],
        "per_lr": {lr: {"val_top1": v, "select_top1": s} for lr, v, s in zip(lrs, val_acc, sel_acc)},
        "num_train": int(fit_idx.numel()),
        "num_holdout": int(n_hold),
        "num_val": int(va_x.shape[0]),
        "num_classes": num_classes,
        # the no-information baseline: val accuracy of always answering the train split's commonest class
        "majority_top1": 100.0 * (va_y == torch.mode(tr_y).values).float().mean().item(),
        "selected_on": selected_on,
        "encoder": name,
    }
