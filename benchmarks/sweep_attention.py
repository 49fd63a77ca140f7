"""Which configuration of the prefix-attention kernels is fastest, per (head dim, length bucket, dtype):
one prepared GPU call (`make gpu-more`'s sweep_attention stage), every candidate checked correct first.

Candidates (kernels/prefix_attention.py `_AttentionTiles`): forward tiles FWD, with pointer or TMA
loads (`fwd_tma`: q, k, v tiles through tensor descriptors; checked like every candidate, on the
GPU's compiled TMA path before it is timed), and backward forms BWD
(split: dk/dv and dq launches; fused: one launch holding both; atomic: dq added into an fp32 buffer by
the dk/dv programs) with their tiles, 8-warp Flex-like and 4-warp two-programs-per-SM shapes among them.
The default configuration of `_tiles` is a candidate too (`default` true on its rows).

Per shape (GPU, bf16: encoder N=256 and 1024 with the benchmark's prefix draw, decoder N=334 causal, at
D=128, H=8, and encoder N=256 at D=64, H=16):
1. correctness: every candidate's out, dq, dk, dv on a 2-sample batch of the same N and D against fp64
   prefix_attention_ref, under the tests' rule (error <= 3 x same-dtype SDPA's error + 2 ulp of the
   largest magnitude); a candidate that fails is recorded (`correct` false) and never timed;
2. timing of the launchers alone at the full batch: device time by CUDA-graph replay
   (triton.testing.do_bench_cudagraph, `timing` "graph") and host-timed (do_bench, "host");
   compiled FlexAttention and cuDNN causal SDPA in the same run, timed the same two ways where they
   can be captured;
3. the winner per (shape, pass): printed, and `--write-table ROWS` turns a rows file into
   kernels/_attention_table.py (the fastest correct forward and backward by device time per key).

Rows (CONVENTIONS.md): op "prefix_attention", pass "fwd" | "bwd", shape, dtype, provider ("aimv2",
"flex", "sdpa_cudnn_causal"), ms, `timing` (a "host" row carries the same candidate's graph time as
`ms_device`: host-timed beside device time), `config` (the candidate's name), `default`, `correct`,
`err_ratio` (worst error / bound over out and the gradients), tflops on the visible pairs,
`capability` ([major, minor]), `head_dim`, `n_bucket`.

    python benchmarks/sweep_attention.py --gpu-quick            # the prepared call (<= 150 s on an H100)
    python benchmarks/sweep_attention.py --write-table benchmarks/results/sweep_attention-<GPU>-<date>.json
    python benchmarks/sweep_attention.py --quick                # CPU smoke run: interpreter, tiny shape
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (name, fwd Tiles, TMA loads) / (name, bwd form, dkdv Tiles, dq Tiles); Tiles = (block_m, block_n, warps, stages)
FWD = [("f128x64w8", (128, 64, 8, 3), False), ("f64x64w4", (64, 64, 4, 3), False),
       ("f128x128w8", (128, 128, 8, 2), False),
       ("f128x64w8tma", (128, 64, 8, 3), True), ("f64x64w4tma", (64, 64, 4, 3), True)]
BWD = [("split", "split", (32, 128, 8, 2), (128, 32, 8, 2)),
       ("split4w", "split", (32, 64, 4, 2), (64, 32, 4, 2)),
       ("fused", "fused", (32, 128, 8, 2), (128, 32, 8, 2)),
       ("fused64", "fused", (64, 128, 8, 3), (128, 64, 8, 3)),
       ("atomic", "atomic", (32, 128, 8, 2), (128, 32, 8, 2)),
       ("atomic64", "atomic", (64, 128, 8, 2), (128, 32, 8, 2)),
       ("atomic4w", "atomic", (32, 64, 4, 2), (64, 32, 4, 2))]
# the interpreter's candidates (--quick): tiles it runs in seconds
FWD_QUICK = [("f32x16", (32, 16, 4, 1), False), ("f16x16", (16, 16, 4, 1), False), ("f32x16tma", (32, 16, 4, 1), True)]
BWD_QUICK = [(m, m, (16, 32, 4, 1), (32, 16, 4, 1)) for m in ("split", "fused", "atomic")]
# (bench_attention shape, batch, heads, head dim)
GPU_SHAPES = [("encoder-256", 128, 8, 128), ("encoder-1024", 32, 8, 128), ("decoder-334", 128, 8, 128),
              ("encoder-256", 128, 16, 64)]
QUICK_SHAPES = [("encoder-256", 2, 2, 32)]


def _modules():
    PA = importlib.import_module("aimv2.kernels.prefix_attention")
    from aimv2.kernels._utils import Tiles
    return PA, Tiles


def candidates(D: int, dtype, device, quick: bool) -> list[tuple[str, str, object]]:
    """[(pass, name, _AttentionTiles)]: each forward candidate and each backward candidate on top of
    `_tiles`'s default (whose own forward and backward are candidates named "default")."""
    PA, Tiles = _modules()
    base = PA._tiles(D, dtype, device)
    out = [("fwd", "default", base), ("bwd", "default", base)]
    for name, t, tma in (FWD_QUICK if quick else FWD):
        out.append(("fwd", name, dataclasses.replace(base, fwd=Tiles(*t), fwd_tma=tma)))
    for name, form, kv, q in (BWD_QUICK if quick else BWD):
        out.append(("bwd", name, dataclasses.replace(base, bwd=form, dkdv=Tiles(*kv), dq=Tiles(*q))))
    return out


def _plen(case) -> torch.Tensor:
    p = case.prefix_len
    return p.to(torch.int32) if torch.is_tensor(p) else torch.full((case.B,), p, dtype=torch.int32,
                                                                    device=case.q.device)


def check(case, cfg) -> float:
    """The worst (error / bound) over out, dq, dk, dv of cfg's launchers on `case` (a small batch),
    the bound being the tests' rule: 3 x the error of same-dtype SDPA with the dense mask + 2 ulp of
    the largest magnitude (2 x for out); <= 1 passes."""
    import torch.nn.functional as F
    PA, _ = _modules()
    q, k, v, do = (t.detach() for t in (case.q, case.k, case.v, case.dout))
    plen, scale = _plen(case), case.D ** -0.5
    qc, kc, vc = ((t.float() if PA._interpreter_needs_fp32(t) else t) for t in (q, k, v))
    out, lse = PA._fwd_launch(qc, kc, vc, plen, scale, cfg=cfg)
    got = [out, *PA._bwd_launch(do.to(qc.dtype), qc, kc, vc, out, lse, plen, scale, cfg=cfg)]

    def grads(fn, *xs):
        xs = [x.detach().requires_grad_() for x in xs]
        o = fn(*xs)
        return [o.detach(), *torch.autograd.grad(o, xs, do.to(o.dtype))]
    mask = PA.prefix_mask(plen.long(), case.B, case.N, q.device)
    truth = grads(lambda *t: PA.prefix_attention_ref(*t, plen.long()), q.double(), k.double(), v.double())
    same = grads(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v)
    eps = torch.finfo(q.dtype).eps * max(t.abs().max().item() for t in truth)
    worst = 0.0
    for i, (g, s, t) in enumerate(zip(got, same, truth)):
        bound = (2.0 if i == 0 else 3.0) * (s.double() - t).abs().max().item() + 2 * eps
        err = (g.double() - t).abs().max().item()
        worst = max(worst, err / bound if bound > 0 else (0.0 if err == 0 else float("inf")))
    return worst


def _time(fn, graph: bool) -> float | None:
    """Median ms: CUDA-graph replay (device time) or host launches; None when fn cannot be captured."""
    if not torch.cuda.is_available():
        from _common import bench
        return bench(fn)[0]
    import triton.testing
    try:
        fn()
        torch.cuda.synchronize()
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=50))
        return float(triton.testing.do_bench(fn, warmup=10, rep=50))
    except Exception as e:                                         # noqa: BLE001 - a baseline that cannot be captured
        print(f"    ({'graph' if graph else 'host'} timing failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        torch.cuda.synchronize()
        return None


def sweep_shape(spec, device, dtype, quick: bool, ceilings: dict, command: str, emit) -> None:
    """Check, then time, every candidate on one shape; the baselines; print the winners."""
    import bench_attention as BA
    from _common import result_row
    PA, _ = _modules()
    name, B, H, D = spec
    N = max(8, BA.SHAPES[name][0] // 16) if quick else None
    case = BA.make_case(name, B, H, D, device, dtype, N)
    small = BA.make_case(name, 2, H, D, device, dtype, case.N)
    pairs = BA.unmasked_pairs(case, case.kind)
    plen, scale = _plen(case), D ** -0.5
    q, k, v, do = (t.detach() for t in (case.q, case.k, case.v, case.dout))
    cap = list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    timings = ("host",) if quick or device.type != "cuda" else ("graph", "host")
    best = {}
    base = dict(shape=case.shape, dtype=BA._DT[dtype], command=command, case=name, mask=case.kind, capability=cap,
                head_dim=D, n_bucket=PA.n_bucket(case.N), unmasked_pairs=pairs)

    def row(pass_, provider, ms, timing, **kw):
        tflops = BA.FLOP_FACTOR[pass_] * 4 * D * pairs / (ms * 1e-3) / 1e12
        pct = 100 * tflops / ceilings["bf16_tflops"] if ceilings.get("bf16_tflops") else None
        emit(result_row(op="prefix_attention", pass_=pass_, provider=provider, ms=ms, timing=timing,
                        tflops=tflops, pct_of_ceiling=pct, **base, **kw))
        print(f"  {name:13s} D={D:<4d}{pass_:4s} {provider:18s} {kw.get('config', ''):10s} {timing:5s} "
              f"{ms:9.3f} ms {tflops:7.1f} TFLOP/s", flush=True)

    out, lse = PA._fwd_launch(q, k, v, plen, scale)                  # the backward's saved tensors
    for pass_, cname, cfg in candidates(D, dtype, device, quick):
        try:
            ratio = check(small, cfg)
        except Exception as e:                                      # noqa: BLE001 - a candidate that cannot compile
            print(f"  {name} {pass_} {cname}: FAILED to run: {type(e).__name__}: {str(e)[:200]}", flush=True)
            ratio = float("inf")
        info = dict(config=cname, default=cname == "default", correct=ratio <= 1.0, err_ratio=ratio,
                    bwd_form=cfg.bwd, fwd_tma=cfg.fwd_tma,
                    tiles={k_: dataclasses.astuple(getattr(cfg, k_)) for k_ in ("fwd", "dkdv", "dq")})
        if ratio > 1.0:
            print(f"  {name} {pass_} {cname}: INCORRECT (error {ratio:.2f} x the bound): not timed", flush=True)
            emit(result_row(op="prefix_attention", pass_=pass_, provider="aimv2", ms=None, timing=None, **base,
                            **info))
            continue
        if pass_ == "fwd":
            fn = lambda cfg=cfg: PA._fwd_launch(q, k, v, plen, scale, cfg=cfg)           # noqa: E731
        else:
            fn = lambda cfg=cfg: PA._bwd_launch(do, q, k, v, out, lse, plen, scale, cfg=cfg)  # noqa: E731
        device_ms = None
        for timing in timings:
            ms = _time(fn, timing == "graph")
            if ms is not None:
                row(pass_, "aimv2", ms, timing, **info, **({"ms_device": device_ms} if timing == "host" else {}))
                if timing == "graph":
                    device_ms = ms
                if timing == timings[0] and ms < best.get(pass_, (float("inf"), ""))[0]:
                    best[pass_] = (ms, cname)
    wanted = {"sdpa_dense"} if quick else {"flex", "sdpa_cudnn_causal"}
    for provider, (fn, mask) in BA.providers(case, wanted).items():
        for pass_ in ("fwd", "bwd"):
            f = BA.pass_fn(case, fn, pass_)
            device_ms = None
            for timing in timings:
                ms = _time(f, timing == "graph")
                if ms is not None:
                    row(pass_, provider, ms, timing, mask_computed=mask,
                        **({"ms_device": device_ms} if timing == "host" else {}))
                    if timing == "graph":
                        device_ms = ms
    for pass_, (ms, cname) in best.items():
        print(f"  winner {name} D={D} {pass_}: {cname} ({ms:.3f} ms, {timings[0]})", flush=True)


def write_table(rows_path: str, table_path: Path = HERE.parent / "kernels" / "_attention_table.py") -> int:
    """kernels/_attention_table.py from a sweep's rows: per (capability, D, bucket, dtype) the fastest
    correct forward and backward candidate by device time (host time where no graph row)."""
    import json
    rows = [r for r in json.loads(Path(rows_path).read_text()) if r.get("provider") == "aimv2" and r.get("correct")
            and r.get("capability") and r.get("ms")]
    if not rows:
        print(f"sweep_attention: no correct GPU rows in {rows_path}: table left as it is", file=sys.stderr)
        return 2
    best: dict = defaultdict(dict)
    for timing in ("host", "graph"):                               # graph rows override host rows
        for r in (r for r in rows if r["timing"] == timing):
            key = (*r["capability"], r["head_dim"], r["n_bucket"], {"bf16": "bfloat16", "fp16": "float16",
                                                                    "fp32": "float32"}[r["dtype"]])
            cur = best[key].get(r["pass"])
            if cur is None or cur.get("timing") != timing or r["ms"] < cur["ms"]:
                best[key][r["pass"]] = r
    entries = {}
    for key, by in sorted(best.items()):
        if "fwd" in by and "bwd" in by:
            f, b = by["fwd"], by["bwd"]
            entries[key] = {"fwd": tuple(f["tiles"]["fwd"]), "dkdv": tuple(b["tiles"]["dkdv"]),
                            "dq": tuple(b["tiles"]["dq"]), "bwd": b["bwd_form"], "fwd_tma": bool(f.get("fwd_tma")),
                            "rows": f"{Path(rows_path).name}: fwd {f['config']} {f['ms']:.3f} ms, "
                                    f"bwd {b['config']} {b['ms']:.3f} ms ({b['timing']})"}
    text = table_path.read_text()
    head = text[:text.index("TABLE: dict")]
    body = "".join(f"    {k!r}: {v!r},\n" for k, v in entries.items())
    table_path.write_text(head + "TABLE: dict[tuple[int, int, int, int, str], dict] = {\n" + body + "}\n")
    print(f"wrote {len(entries)} entries to {table_path}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-quick", action="store_true", help="the prepared call's shapes (the default on a GPU)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: interpreter, one tiny shape")
    ap.add_argument("--write-table", metavar="ROWS", default=None, help="write kernels/_attention_table.py from a "
                    "rows file of this sweep (no measuring)")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them on a GPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    args = ap.parse_args(argv)
    if args.write_table:
        return write_table(args.write_table)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("sweep_attention: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if not cuda:                       # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _common import finish, load_ceilings, result_file
    ceilings = load_ceilings(args.ceilings) if cuda or args.ceilings else {}
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    results = result_file("sweep_attention", args.out, args.quick, ceilings)
    try:
        for spec in (QUICK_SHAPES if args.quick else GPU_SHAPES):
            sweep_shape(spec, device, dtype, args.quick, ceilings, command, results.add)
            if cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
