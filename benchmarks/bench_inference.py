"""Encoder inference (serving) benchmark: images/s and latency of a frozen AIMv2 encoder, bf16.

Cases: aimv2-large and aimv2-1b at 224 px (N = 256) and 448 px (N = 1024), batch 1 and 256, random
weights (the speed does not depend on them). Providers, all on the same weights:

    aimv2          our encoder as `aimv2.from_pretrained` builds it on a GPU: impl="triton" (fused
                   RMSNorm + residual, SwiGLU) and attn_backend="triton" (flash attention, P = N), eager
    aimv2_compile  the same under torch.compile (the kernels are custom ops: no graph break)
    hf_eager       transformers Aimv2VisionModel, SDPA attention, eager
    hf_compile     the same under torch.compile

Rows (CONVENTIONS.md schema): op "encoder_inference", pass "fwd", shape "<preset>-<px>px-b<B>", ms =
median batch latency (do_bench, torch.inference_mode), images_per_s = B / ms, tflops from
`aimv2.model.forward_flops(cfg, "none")` (patch embedding + trunk, bidirectional), pct_of_ceiling over
the bf16 matmul TFLOP/s measured in the same run, max_abs_diff_vs_hf = max |ours - transformers| on one
batch (sanity: both run the same weights). The issue's target: aimv2 >= 1.3x hf_compile at batch 256.

    python benchmarks/bench_inference.py                       # GPU: every case and provider
    python benchmarks/bench_inference.py --presets aimv2-large --sizes 224 --batches 256
    pytest benchmarks/bench_inference.py                       # the same through pytest-benchmark (GPU)
    python benchmarks/bench_inference.py --quick               # CPU smoke run: tiny encoder, Triton
                                                               # interpreter, results to a temp dir
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROVIDERS = ("aimv2", "aimv2_compile", "hf_eager", "hf_compile")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _hf_model(cfg, state_dict, device, dtype):
    """transformers Aimv2VisionModel (SDPA) holding our encoder's weights."""
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    from aimv2.weights import from_mlaim
    hcfg = Aimv2VisionConfig(hidden_size=cfg.dim, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.depth,
                             num_attention_heads=cfg.num_heads, image_size=cfg.img_size, patch_size=cfg.patch_size,
                             rms_norm_eps=cfg.norm_eps, use_head=False, qkv_bias=False, mlp_bias=False)
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Aimv2VisionModel(hcfg)
    sd = {k: v.to(device, dtype) for k, v in from_mlaim(state_dict, "hf").items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.embeddings.position_ids = torch.arange(cfg.num_patches, device=device)[None]   # non-persistent buffer
    return model.eval()


def _our_encoder(cfg, device, dtype, backend):
    """The encoder `from_pretrained` returns for `device` (same backend selection), random weights."""
    from aimv2.eval.hub import select_backend
    from aimv2.model import AIMv2Encoder
    impl, attn, why = select_backend(device, backend)
    print(f"aimv2 backend: impl={impl} attn_backend={attn} ({why})")
    torch.manual_seed(0)
    with torch.device(device):
        enc = AIMv2Encoder(cfg.replace(impl=impl, attn_backend=attn))
    return enc.to(dtype).eval()


def run_case(preset, img, batch, device, dtype, wanted, ceilings, command, quick=False, backend="auto"):
    from _common import bench, peak_mem_mb, result_row

    from aimv2.model import forward_flops
    from aimv2.presets import get_preset
    from aimv2.config import ModelConfig

    if quick:
        cfg = ModelConfig(name="tiny-bench", img_size=img, dim=256, depth=2, num_heads=2, mlp_hidden=512)
    else:
        cfg = get_preset(preset, img_size=img)
    enc = _our_encoder(cfg, device, dtype, backend)
    hf = _hf_model(cfg, enc.state_dict(), device, dtype) if wanted & {"hf_eager", "hf_compile"} else None
    x = torch.randn(batch, 3, img, img, device=device, dtype=dtype)
    fns = {}
    if "aimv2" in wanted:
        fns["aimv2"] = lambda: enc(x)
    if "aimv2_compile" in wanted:
        cenc = torch.compile(enc)
        fns["aimv2_compile"] = lambda: cenc(x)
    if "hf_eager" in wanted:
        fns["hf_eager"] = lambda: hf(pixel_values=x).last_hidden_state
    if "hf_compile" in wanted:
        chf = torch.compile(hf)
        fns["hf_compile"] = lambda: chf(pixel_values=x).last_hidden_state
    flops = batch * (lambda f: f["patch_embed"] + f["encoder"])(forward_flops(cfg, "none"))
    shape = f"{cfg.name}-{img}px-b{batch}"
    rows, ref = [], None
    with torch.inference_mode():
        if hf is not None:
            ref = hf(pixel_values=x).last_hidden_state.float()
        for provider, fn in fns.items():
            out = fn().float()                                          # warm-up / compile
            diff = (out - ref).abs().max().item() if ref is not None else None
            ms, p20, p80 = bench(fn)
            tflops = flops / (ms * 1e-3) / 1e12
            peak = peak_mem_mb(fn)
            ceil = ceilings.get("bf16_tflops")
            rows.append(result_row(op="encoder_inference", pass_="fwd", shape=shape, dtype=_DT[dtype],
                                   provider=provider, ms=ms, ms_p20=p20, ms_p80=p80, tflops=tflops,
                                   pct_of_ceiling=100.0 * tflops / ceil if ceil else None, peak_mem_mb=peak,
                                   command=command, images_per_s=batch / (ms * 1e-3), batch=batch,
                                   img_size=img, max_abs_diff_vs_hf=diff))
            print(f"  {shape:28s} {provider:14s} {ms:9.3f} ms  {batch / (ms * 1e-3):9.1f} img/s  "
                  f"{tflops:7.1f} TFLOP/s" + (f"  |diff| {diff:.2e}" if diff is not None else ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="aimv2-large,aimv2-1b")
    ap.add_argument("--sizes", default="224,448")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: tiny encoder at 28 px, batch 1 and 2, Triton interpreter, no compile")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; temp dir with --quick)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench_inference: no CUDA device; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    if not cuda:                       # before aimv2.kernels defines its @triton.jit functions
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from _common import finish, measure_ceilings, result_file
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32        # bf16 tl.dot is broken in the interpreter
    wanted = set(args.providers.split(","))
    if args.quick and not cuda:
        wanted -= {"aimv2_compile", "hf_compile"}            # minutes of CPU compile for a smoke run
    ceilings = measure_ceilings() if cuda else {}
    print(f"ceilings: {ceilings}")
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    presets = ["tiny"] if args.quick else args.presets.split(",")
    sizes = [28] if args.quick else [int(s) for s in args.sizes.split(",")]
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    backend = "triton" if args.quick else "auto"
    results = result_file("inference", args.out, args.quick, ceilings)
    try:
        for preset in presets:
            for img in sizes:
                for batch in batches:
                    results.extend(run_case(preset, img, batch, device, dtype, wanted, ceilings, command,
                                            args.quick, backend))
                    if cuda:
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
    CASES = [(p, s, b) for p in ("aimv2-large", "aimv2-1b") for s in (224, 448) for b in (1, 256)]

    @pytest.fixture(scope="module")
    def _session():
        from _common import gpu_session
        yield from gpu_session("inference")

    @pytest.mark.parametrize("preset,img,batch", CASES)
    def test_inference_benchmark(benchmark, _session, preset, img, batch):
        rows = run_case(preset, img, batch, torch.device("cuda"), torch.bfloat16, set(PROVIDERS),
                        _session["ceilings"], "pytest benchmarks/bench_inference.py")
        _session["results"].extend(rows)
        benchmark.extra_info["rows"] = rows
        benchmark.pedantic(lambda: None, rounds=1)          # timings are in the rows (do_bench)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
