"""Native-resolution encoder benchmark (issue 17): packed images at their own aspect ratio vs the padded
square batch users run today, images/s of a frozen encoder.

Batch: B images cycling through a realistic aspect-ratio mix (width:height) 4:3, 3:4, 16:9, 1:1, 9:16
(source photos 1440x1080, 1080x1440, 1920x1080, 1080x1080, 1080x1920), each given the patch grid
`aimv2.eval.embed.native_grid` picks under a per-image budget of --max-patches patches (what
`aimv2 embed --native` does). Providers, same architecture, same device, dtype and backend:

    packed   the native encoder (`native=True`, sin-cos positions): `forward_packed` on the PackedBatch,
             one sequence of sum(h_s w_s) tokens (Triton varlen attention on a GPU, SDPA per image on CPU)
    padded   today's recipe: every image resized to the batch's largest square S = 14 * max(h_s, w_s)
             (a 16:9 image sets S by its long side) and run as one (B, 3, S, S) batch through the
             fixed-size encoder at img_size S (learned table; same FLOPs per token)

Timed: the encoder forward only (torch.inference_mode); packing / resizing is preprocessing for both.
Rows (CONVENTIONS.md schema): op "encoder_native", pass "fwd", shape "<preset>-<max_patches>p-b<B>",
ms = median batch latency (do_bench on a GPU; on a CPU the providers alternate for --cpu-rounds rounds,
so a loaded machine slows both alike), images_per_s = B / ms, tokens = tokens the encoder ran, useful_tokens =
sum(h_s w_s), tflops from the tokens actually run (`aimv2.model` linear + attention FLOP count, per
image grid), speedup_vs_padded on the packed row; max_abs_diff_alone = packed output of image 0 vs
that image run alone (sanity).

    python benchmarks/bench_native.py                      # GPU: aimv2-large, budgets 256 and 1024, B = 64
    python benchmarks/bench_native.py --preset aimv2-1b --max-patches 1024 --batch 128
    python benchmarks/bench_native.py --quick              # CPU smoke run: tiny encoder, budget 64, B = 10
    python benchmarks/bench_native.py --device cpu --preset aimv2-tiny --max-patches 256 --batch 10

Results go to benchmarks/results/native-<device>-<date>.json (a temp dir with --quick unless --out is
given), each row appended the moment it is measured; SIGINT stops the run with the rows kept (exit 130).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

PATCH = 14
# aspect (width:height) -> source photo (H, W) in pixels
MIX = {"4:3": (1080, 1440), "3:4": (1440, 1080), "16:9": (1080, 1920), "1:1": (1080, 1080), "9:16": (1920, 1080)}
PROVIDERS = ("packed", "padded")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def mix_grids(batch: int, max_patches: int) -> list[tuple[int, int]]:
    """The B images' patch grids: the aspect mix cycled, each under the per-image patch budget."""
    from aimv2.eval.embed import native_grid
    srcs = list(MIX.values())
    return [native_grid(*srcs[i % len(srcs)], patch_size=PATCH, max_patches=max_patches) for i in range(batch)]


def _flops(cfg, tokens_per_image) -> float:
    """Forward FLOPs (2 per multiply-add) of the patch embedding + trunk for images of the given token
    counts, bidirectional attention (the count of aimv2.model.forward_flops, per image length)."""
    D, H = cfg.dim, cfg.mlp_hidden
    tot = 0.0
    for n in tokens_per_image:
        tot += 2.0 * n * D * cfg.patch_dim
        tot += cfg.depth * (2.0 * n * (4 * D * D + 3 * D * H) + 4.0 * D * n * n)
    return tot


def _encoders(cfg, device, dtype, backend):
    """(native encoder, padded-square encoder factory), random weights shared."""
    from aimv2.eval.hub import select_backend
    from aimv2.model import AIMv2Encoder
    impl, attn, why = select_backend(device, backend)
    print(f"aimv2 backend: impl={impl} attn_backend={attn} ({why})")
    torch.manual_seed(0)
    with torch.device(device):
        nat = AIMv2Encoder(cfg.replace(native=True, native_pos="sincos", impl=impl, attn_backend=attn))
    nat = nat.to(dtype).eval()

    def padded(img_size):
        with torch.device(device):
            enc = AIMv2Encoder(cfg.replace(img_size=img_size, native=False, impl=impl, attn_backend=attn))
        sd = dict(nat.state_dict())
        sd["preprocessor.pos_embed"] = enc.preprocessor.pos_embed.detach()
        enc.load_state_dict(sd)
        return enc.to(dtype).eval()
    return nat, padded


def _cpu_interleaved(fns: dict, rounds: int) -> dict:
    """CPU timing: the providers alternate for `rounds` rounds (a shared, loaded machine then slows
    both alike); (median, 20th, 80th percentile) ms per provider."""
    import time
    times = {p: [] for p in fns}
    for _ in range(rounds):
        for p, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[p].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for p, t in times.items():
        t = sorted(t)
        q = lambda f: t[min(len(t) - 1, int(f * (len(t) - 1) + 0.5))]      # noqa: E731
        out[p] = (q(0.5), q(0.2), q(0.8))
    return out


def run_case(cfg, max_patches, batch, device, dtype, wanted, ceilings, command, backend="auto", cpu_rounds=5):
    from _common import bench, peak_mem_mb, result_row

    from aimv2.packing import pack_images
    grids = mix_grids(batch, max_patches)
    nat, make_padded = _encoders(cfg, device, dtype, backend)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h * PATCH, w * PATCH, generator=g).to(device, dtype) for h, w in grids]
    pack = pack_images(images, PATCH)
    S = PATCH * max(max(h, w) for h, w in grids)
    useful = sum(h * w for h, w in grids)
    shape = f"{cfg.name}-{max_patches}p-b{batch}"
    fns, tokens = {}, {}
    if "packed" in wanted:
        fns["packed"] = lambda: nat.forward_packed(pack, packed_output=True)
        tokens["packed"] = [h * w for h, w in grids]
    if "padded" in wanted:
        enc_sq = make_padded(S)
        x = torch.stack([F.interpolate(im[None].float(), size=(S, S), mode="bilinear", align_corners=False)[0]
                         for im in images]).to(dtype)                           # (B, 3, S, S)
        fns["padded"] = lambda: enc_sq(x)
        tokens["padded"] = [(S // PATCH) ** 2] * batch
    rows, ms_of = [], {}
    mix = ",".join(MIX)
    with torch.inference_mode():
        diff = None
        if "packed" in fns:
            out = nat.forward_packed(pack)
            diff = (out[0].float() - nat(images[0][None])[0].float()).abs().max().item()
        for fn in fns.values():
            fn()                                                                # warm-up
        timed = _cpu_interleaved(fns, cpu_rounds) if device.type == "cpu" else {p: bench(f) for p, f in fns.items()}
        for provider, fn in fns.items():
            ms, p20, p80 = timed[provider]
            ms_of[provider] = ms
            flops = _flops(cfg, tokens[provider])
            tflops = flops / (ms * 1e-3) / 1e12
            ceil = ceilings.get("bf16_tflops")
            extra = {"max_abs_diff_alone": diff} if provider == "packed" else {}
            rows.append(result_row(op="encoder_native", pass_="fwd", shape=shape, dtype=_DT[dtype],
                                   provider=provider, ms=ms, ms_p20=p20, ms_p80=p80, tflops=tflops,
                                   pct_of_ceiling=100.0 * tflops / ceil if ceil else None,
                                   peak_mem_mb=peak_mem_mb(fn), command=command,
                                   images_per_s=batch / (ms * 1e-3), batch=batch, max_patches=max_patches,
                                   aspect_mix=mix, grids=[list(t) for t in grids], padded_side=S,
                                   tokens=sum(tokens[provider]), useful_tokens=useful,
                                   attn_backend=nat.cfg.attn_backend, **extra))
            print(f"  {shape:26s} {provider:8s} {ms:10.2f} ms  {batch / (ms * 1e-3):9.1f} img/s  "
                  f"{sum(tokens[provider]):7d} tokens ({useful} useful)  {tflops:7.3f} TFLOP/s", flush=True)
    if "packed" in ms_of and "padded" in ms_of:
        for r in rows:
            if r["provider"] == "packed":
                r["speedup_vs_padded"] = ms_of["padded"] / ms_of["packed"]
        print(f"  packed vs padded: {ms_of['padded'] / ms_of['packed']:.2f}x images/s")
    return rows


def _config(preset, quick):
    from aimv2.config import ModelConfig
    from aimv2.presets import get_preset
    if quick:
        return ModelConfig(name="tiny-bench", img_size=224, dim=64, depth=2, num_heads=2, mlp_hidden=256)
    return get_preset(preset)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="aimv2-large")
    ap.add_argument("--max-patches", default="256,1024", help="per-image patch budgets (comma-separated)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--device", default=None, help="default cuda when available (cpu needs --quick or this flag)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: tiny encoder (D 64, 2 blocks), budget 64 patches, B = 10, fp32")
    ap.add_argument("--cpu-rounds", type=int, default=5,
                    help="CPU timing: rounds of the providers run alternately (median reported)")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them on a GPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if cuda and not args.quick else "cpu"))
    if device.type == "cpu" and not (args.quick or args.device):
        print("bench_native: no CUDA device; use --quick (or --device cpu) for a CPU run", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.backend == "triton":   # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _common import finish, load_ceilings, result_file
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceilings = load_ceilings(args.ceilings) if device.type == "cuda" or args.ceilings else {}
    print(f"ceilings: {ceilings}")
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    cfg = _config(args.preset, args.quick)
    budgets = [64] if args.quick else [int(b) for b in args.max_patches.split(",")]
    batch = 10 if args.quick else args.batch
    wanted = set(args.providers.split(","))
    results = result_file("native", args.out, args.quick, ceilings)
    try:
        for budget in budgets:
            results.extend(run_case(cfg, budget, batch, device, dtype, wanted, ceilings, command, args.backend,
                                    args.cpu_rounds))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


# ------------------------------------------------------------------ pytest-benchmark harness
try:
    import pytest
except ImportError:                    # the CLI does not need pytest
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module")
    def _session():
        from _common import gpu_session
        yield from gpu_session("native")

    @pytest.mark.parametrize("max_patches", [256, 1024])
    def test_native_benchmark(benchmark, _session, max_patches):
        from aimv2.presets import get_preset
        rows = run_case(get_preset("aimv2-large"), max_patches, 64, torch.device("cuda"), torch.bfloat16,
                        set(PROVIDERS), _session["ceilings"], "pytest benchmarks/bench_native.py")
        _session["results"].extend(rows)
        benchmark.extra_info["rows"] = rows
        benchmark.pedantic(lambda: None, rounds=1)          # timings are in the rows (do_bench)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
