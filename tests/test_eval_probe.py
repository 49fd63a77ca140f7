"""Attentive probe (method.md §6): module math and gradients against an fp64 reference, the heads rule, learning
a separable toy problem from features, learning-rate selection on held-out train, and `aimv2 probe` end to
end on tiny synthetic shards (tiny encoder at 56 px, torch backend on the CPU)."""
from __future__ import annotations

import copy
import io
import json
import math
import re
import tarfile

import pytest
import torch
from PIL import Image

from aimv2.config import ModelConfig
from aimv2.eval import probe as P
from aimv2.eval.probe import AttentiveProbe, probe_heads, random_encoder_like, run_probe, train_probes
from aimv2.model import AIMv2Encoder

TINY = ModelConfig(name="tiny56", img_size=56, dim=128, depth=2, num_heads=1, mlp_hidden=256)


# ----------------------------------------------------------------------------- module
@pytest.mark.parametrize("dim,heads", [(1024, 8), (1536, 12), (2048, 16), (3072, 24), (256, 2), (128, 1),
                                       (64, 1), (100, 1), (640, 5), (1000, 5), (1152, 9)])
def test_heads_rule(dim, heads):
    """D // 128 heads (head dim 128); 1 below 128; lowered to a divisor of D (1000 // 128 = 7 -> 5)."""
    assert probe_heads(dim) == heads
    assert dim % probe_heads(dim) == 0


def _probe_ref(probe: AttentiveProbe, x: torch.Tensor) -> torch.Tensor:
    """fp64 spec: BN with batch statistics (biased var, eps 1e-6, no affine), one query, H heads, linear."""
    B, N, D = x.shape
    H = probe_heads(D)
    Dh = D // H
    xf = x.double()
    mean, var = xf.mean((0, 1)), xf.var((0, 1), unbiased=False)
    xh = (xf - mean) / torch.sqrt(var + 1e-6)
    k = (xh @ probe.k.weight.double().T).view(B, N, H, Dh)
    v = (xh @ probe.v.weight.double().T).view(B, N, H, Dh)
    q = probe.query.double().view(H, Dh)
    a = torch.softmax(torch.einsum("bnhd,hd->bhn", k, q) / math.sqrt(Dh), dim=-1)
    o = torch.einsum("bhn,bnhd->bhd", a, v).reshape(B, D)
    return o @ probe.head.weight.double().T + probe.head.bias.double()


def test_probe_structure():
    p = AttentiveProbe(256, 7)
    assert p.num_heads == 2
    assert isinstance(p.norm, torch.nn.BatchNorm1d) and not p.norm.affine and p.norm.eps == 1e-6
    assert p.norm.weight is None and p.norm.bias is None
    assert p.k.bias is None and p.v.bias is None and p.head.bias is not None
    assert tuple(p.query.shape) == (1, 1, 256)
    n = sum(t.numel() for t in p.parameters())
    assert n == 256 + 2 * 256 * 256 + 256 * 7 + 7          # query, K, V, classifier: nothing else
    with pytest.raises(ValueError, match="num_classes"):
        AttentiveProbe(256, 1)
    with pytest.raises(ValueError, match="tokens"):
        p(torch.randn(2, 5, 128))


def test_probe_forward_and_grads_match_fp64_reference():
    torch.manual_seed(1)
    B, N, D, C = 5, 7, 256, 3
    p = AttentiveProbe(D, C).train()
    with torch.no_grad():                   # non-trivial query so the attention is not uniform
        p.query.normal_(0, 1.0)
    x = torch.randn(B, N, D) * 2.5 + 0.7
    # fp32 forward against the fp64 spec
    out = p(x)
    ref = _probe_ref(p, x)
    assert out.shape == (B, C)
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    # every gradient, module in fp64 vs the spec in fp64
    p64 = copy.deepcopy(p).double()
    x64 = x.double().requires_grad_(True)
    x64r = x.double().requires_grad_(True)
    w = torch.randn(B, C, dtype=torch.float64)
    ref_p = copy.deepcopy(p64)
    (p64(x64) * w).sum().backward()
    (_probe_ref(ref_p, x64r) * w).sum().backward()
    for (name, a), b in zip(p64.named_parameters(), ref_p.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(x64.grad, x64r.grad, rtol=1e-9, atol=1e-12)


def test_probe_eval_uses_running_stats():
    p = AttentiveProbe(128, 3).train()
    x = torch.randn(4, 6, 128) * 3 + 1
    p(x)
    mean = x.mean((0, 1))
    torch.testing.assert_close(p.norm.running_mean, 0.1 * mean)
    p.eval()
    y1 = p(x[:1])
    y2 = p(x)[:1]                            # batch-independent in eval mode
    torch.testing.assert_close(y1, y2)


# ----------------------------------------------------------------------------- training on fixtures
def _toy_features(M, N=8, D=64, C=4, seed=0):
    """Class c plants +3 * mu_c on one random token of N noise tokens: only attention pooling finds it."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.nn.functional.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(99)), dim=1)
    y = torch.randint(0, C, (M,), generator=g)
    x = torch.randn(M, N, D, generator=g)
    pos = torch.randint(0, N, (M,), generator=g)
    x[torch.arange(M), pos] += 3.0 * mu[y] * math.sqrt(D) / 2
    return x.half(), y


def test_probe_learns_separable_toy_problem():
    xtr, ytr = _toy_features(256, seed=0)
    xva, yva = _toy_features(128, seed=1)
    probes = train_probes(xtr, ytr, 4, [1e-3, 3e-3], epochs=15, batch_size=64, progress=False)
    acc = [P.top1(p, yva) for p in P.predict(probes, xva)]
    assert max(acc) >= 90.0, acc
    # control: the same probe on labels that carry no information stays near chance (25%)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    probes = train_probes(xtr, ytr[perm], 4, [3e-3], epochs=15, batch_size=64, progress=False)
    assert P.top1(P.predict(probes, xva)[0], yva) < 50.0


def test_probes_trained_side_by_side_equal_probes_trained_alone():
    """The grid shares batches and the BatchNorm pass only: probe 0 of a 3-rate grid is the lone probe."""
    x, y = _toy_features(96, seed=4)
    grid = train_probes(x, y, 4, [1e-3, 1e-2, 3e-4], epochs=2, batch_size=32, seed=7, progress=False)
    alone = train_probes(x, y, 4, [1e-3], epochs=2, batch_size=32, seed=7, progress=False)
    for (n, a), b in zip(grid[0].state_dict().items(), alone[0].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert not torch.allclose(grid[1].k.weight, alone[0].k.weight)
    torch.testing.assert_close(grid[2].norm.running_var, alone[0].norm.running_var)


def test_run_probe_picks_lr_on_holdout(monkeypatch):
    """A grid with a useless rate (1e-8) and a good one: the holdout picks the good one; train/holdout split."""
    feats = {"train": _toy_features(200, seed=0), "val": _toy_features(100, seed=1)}
    monkeypatch.setattr(P, "_shard_features", lambda enc, shards, split, *a, **k: feats[split])
    enc = AIMv2Encoder(TINY)
    res = run_probe(encoder=enc, train_shards="x", val_shards="y", lrs=(1e-8, 3e-3), epochs=15,
                    batch_size=64, progress=False)
    assert res["selected_on"] == "holdout"
    assert res["num_holdout"] == 20 and res["num_train"] == 180 and res["num_val"] == 100
    assert res["num_classes"] == 4
    assert res["best_lr"] == 3e-3
    assert res["top1"] == res["per_lr"][3e-3]["val_top1"] >= 90.0
    assert res["per_lr"][1e-8]["val_top1"] < 60.0


def test_feature_cache_is_keyed_by_weights_and_data(monkeypatch, tmp_path):
    feats = {"train": _toy_features(64, seed=0), "val": _toy_features(32, seed=1)}
    calls = []

    def fake(enc, shards, split, *a, **k):
        calls.append((split, shards))
        return feats[split]

    monkeypatch.setattr(P, "_shard_features", fake)
    enc = AIMv2Encoder(TINY)
    kw = dict(val_shards="v", lrs=(1e-3,), epochs=2, progress=False, feature_cache=str(tmp_path))
    r1 = run_probe(encoder=enc, train_shards="t", **kw)
    assert len(calls) == 2
    r2 = run_probe(encoder=enc, train_shards="t", **kw)                 # both splits from the cache
    assert len(calls) == 2 and r2["top1"] == r1["top1"]
    run_probe(encoder=enc, train_shards="t2", **kw)                      # other train data: train recomputed
    assert calls[2:] == [("train", "t2")]
    with torch.no_grad():
        enc.trunk.blocks[0].mlp.fc2.weight.mul_(1.5)                     # same name, new weights
    run_probe(encoder=enc, train_shards="t", **kw)
    assert len(calls) == 5
    run_probe(encoder=enc, train_shards="t", random_init=True, **kw)
    assert len(calls) == 7
    # the same pattern over files rewritten in place (a dataset regenerated, e.g. a new synth VERSION)
    shard = tmp_path / "data" / "00000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"x" * 10)
    run_probe(encoder=enc, train_shards=str(shard), **kw)
    run_probe(encoder=enc, train_shards=str(shard), **kw)
    assert len(calls) == 8                                               # computed once, then cached
    shard.write_bytes(b"y" * 20)
    run_probe(encoder=enc, train_shards=str(shard), **kw)
    assert calls[8:] == [("train", str(shard))]


def test_random_encoder_like_same_config_new_weights():
    torch.manual_seed(5)
    enc = AIMv2Encoder(TINY)
    a, b = random_encoder_like(enc, seed=0), random_encoder_like(enc, seed=0)
    assert a.cfg == enc.cfg
    for (n, pa), pb, pe in zip(a.named_parameters(), b.parameters(), enc.parameters()):
        assert torch.equal(pa, pb), n                                   # fixed seed: reproducible
        if pe.dim() >= 2:
            assert not torch.equal(pa, pe), n                           # fresh weights


# ----------------------------------------------------------------------------- end to end on shards
def _write_shard(path, labels, size=28, key="label"):
    with tarfile.open(path, "w") as tar:
        for i, lab in enumerate(labels):
            im = Image.new("RGB", (size, size), (40 * i % 255, 90, 160))
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            meta = {key: lab} if key else {}
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a red square"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from aimv2.data.synth import write_synthetic_dataset
    from aimv2.weights import save_encoder

    root = tmp_path_factory.mktemp("probe")
    write_synthetic_dataset(str(root / "train"), num=64, size=56, seed=0)
    write_synthetic_dataset(str(root / "val"), num=32, size=56, seed=1)
    torch.manual_seed(0)
    save_encoder(AIMv2Encoder(TINY), str(root / "enc.safetensors"), format="ml-aim")
    return root


def _last_line(text):
    return [ln for ln in text.strip().splitlines() if ln.strip()][-1]


def test_cli_probe_end_to_end(synth, capsys):
    from aimv2.cli import main

    args = ["probe", "--checkpoint", str(synth / "enc.safetensors"), "--train", str(synth / "train"),
            "--val", str(synth / "val"), "--epochs", "3", "--num-workers", "0", "--no-progress", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    last = _last_line(out)
    assert re.fullmatch(r"top-1: \d{1,3}\.\d\d", last), last
    res = json.loads(out.splitlines()[0])
    assert res["num_train"] + res["num_holdout"] == 64 and res["num_val"] == 32
    assert res["num_classes"] <= 48 and len(res["per_lr"]) == 3
    assert last == f"top-1: {res['top1']:.2f}"
    # the random-init baseline through the same command
    assert main(args[:-1] + ["--random-init", "--lrs", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"top-1: \d{1,3}\.\d\d", _last_line(out))
    assert "random-init" in out


def test_probe_clear_errors(synth, tmp_path, capsys):
    from aimv2.cli import main

    ckpt = str(synth / "enc.safetensors")
    kw = dict(epochs=1, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="'nope' is missing"):
        run_probe(ckpt, train_shards=str(synth / "train"), val_shards=str(synth / "val"), label_key="nope", **kw)
    one = _write_shard(tmp_path / "one.tar", [3, 3, 3, 3, 3], size=56)
    with pytest.raises(ValueError, match=">= 2 classes"):
        run_probe(ckpt, train_shards=one, val_shards=one, **kw)
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ValueError, match="train shards"):
        run_probe(ckpt, train_shards=str(empty), val_shards=one, **kw)
    nolabel = _write_shard(tmp_path / "nolabel.tar", [0, 1, 2], size=56, key=None)
    assert main(["probe", "--checkpoint", ckpt, "--train", nolabel, "--val", one, "--num-workers", "0",
                 "--no-progress"]) == 2
    assert "'label' is missing" in capsys.readouterr().err
