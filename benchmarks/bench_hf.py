"""transformers models with attn_implementation="aimv2" (aimv2.hf) against "sdpa": forward and forward+backward.

Cases, random weights (the speed does not depend on them), bf16 on a GPU:

    llama     LlamaModel, hidden 2048, 16 heads of 128, 8 KV heads (GQA), MLP 5632, 4 layers, B=4, N=2048:
              no mask (causal from module.is_causal: prefix_attention with P = 0), left padding (a
              quarter of each sample but the first: prefix_attention_varlen) and right padding (the
              same, plus SDPA for the padded rows, which see every real key)
    siglip    SiglipVisionModel, hidden 768, 12 heads of 64, MLP 3072, 4 layers, 384 px / 16 (N = 576), B=64:
              bidirectional, no mask (P = N)

Providers: "sdpa" (transformers' SDPA path: cuDNN / flash / efficient as torch picks), "aimv2" (our attention
through transformers' attention interface), "aimv2_kernelize" (llama only: plus aimv2.hf.kernelize's RMSNorm).

Rows (CONVENTIONS.md schema): op "hf_llama" / "hf_siglip", pass "fwd" | "fwdbwd", shape
"<case>-b<B>-n<N>[-leftpad|-rightpad]", ms (median, do_bench) with p20 / p80, tokens_per_s, tflops = model FLOPs / time
(2 x params x tokens for the matmuls, x3 with the backward, plus attention 4 B H N^2 D, halved when
causal, only unmasked work), pct_of_ceiling over the bf16 matmul TFLOP/s measured in the same run,
peak_mem_mb, paths = aimv2.hf.counts() of one forward (shows our kernel ran, not a fallback) and
max_abs_diff_vs_sdpa of the last hidden state (sanity).

    python benchmarks/bench_hf.py                      # GPU: every case and provider
    python benchmarks/bench_hf.py --cases siglip
    python benchmarks/bench_hf.py --dry                # CPU plumbing check: tiny models, fp32, the Triton
                                                       # interpreter, rows to a temp dir (never reported)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROVIDERS = ("sdpa", "aimv2", "aimv2_kernelize")
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _llama(dry: bool):
    from transformers import LlamaConfig, LlamaModel
    if dry:
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        return LlamaModel, cfg, 2, 16
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)
    return LlamaModel, cfg, 4, 2048


def _siglip(dry: bool):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    if dry:
        cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=8)
        return SiglipVisionModel, cfg, 2, 16
    cfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                             image_size=384, patch_size=16)
    return SiglipVisionModel, cfg, 64, (384 // 16) ** 2


def _flops(model, cfg, B: int, N: int, causal: bool, backward: bool) -> float:
    """Matmul FLOPs (2 x non-embedding params x tokens) + unmasked attention (4 B H N^2 D per layer)."""
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    D = cfg.hidden_size // cfg.num_attention_heads
    attn = 4.0 * B * cfg.num_attention_heads * N * N * D * cfg.num_hidden_layers * (0.5 if causal else 1.0)
    fwd = 2.0 * params * B * N + attn
    return fwd * (3.0 if backward else 1.0)


def _once(fn) -> tuple[float, float, float]:
    """--dry: one timed call (the plumbing check; CPU interpreter times are never reported)."""
    import time
    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return ms, ms, ms


def run_case(case: str, device, dtype, wanted, ceilings: dict, command: str, add, dry: bool = False) -> None:
    """Measure one case; each row goes to add(row) the moment it is measured."""
    import aimv2.hf
    from _common import bench, peak_mem_mb, result_row
    aimv2.hf.register()
    cls, cfg, B, N = (_llama if case == "llama" else _siglip)(dry)
    wanted = set(wanted)
    torch.manual_seed(0)
    models = {"sdpa": cls(cfg).to(device=device, dtype=dtype)}
    models["aimv2"] = models["sdpa"]                                          # the same weights
    if "aimv2_kernelize" in wanted and case == "llama":
        models["aimv2_kernelize"] = aimv2.hf.kernelize(copy.deepcopy(models["sdpa"]), "training")
    if case == "llama":
        variants = [("", {"input_ids": torch.randint(0, cfg.vocab_size, (B, N), device=device)})]
        left = torch.ones(B, N, dtype=torch.long, device=device)
        left[1:, : N // 4] = 0                                               # left padding (generation)
        right = left.flip(1)                                                 # right padding (training)
        if not dry:                                                          # --dry: the right-padded
            variants.append(("-leftpad", {**variants[0][1], "attention_mask": left}))   # case covers varlen
        variants.append(("-rightpad", {**variants[0][1], "attention_mask": right}))
        causal = True
    else:
        px = torch.randn(B, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
        variants = [("", {"pixel_values": px})]
        causal = False
    providers = [p for p in PROVIDERS if p in wanted and (p != "aimv2_kernelize" or case == "llama")]
    ceiling = ceilings.get("bf16_tflops")
    for suffix, inputs in variants:
        ref_out = None
        for provider in providers:
            model = models[provider]
            model.set_attn_implementation("sdpa" if provider == "sdpa" else "aimv2")
            aimv2.hf.reset_counts()
            with torch.no_grad():
                out = model(**inputs).last_hidden_state
            paths = aimv2.hf.counts()
            ref_out = out if provider == "sdpa" else ref_out
            diff = None if ref_out is None else (out.float() - ref_out.float()).abs().max().item()
            grad_out = torch.randn_like(out)

            def fwd():
                with torch.no_grad():
                    model(**inputs)

            def fwdbwd():
                model.zero_grad(set_to_none=True)
                model(**inputs).last_hidden_state.backward(grad_out)

            for pass_, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
                ms, p20, p80 = _once(fn) if dry else bench(fn)
                flops = _flops(model, cfg, B, N, causal, pass_ == "fwdbwd")
                tflops = flops / (ms * 1e-3) / 1e12
                row = result_row(
                    op=f"hf_{case}", pass_=pass_, shape=f"{case}-b{B}-n{N}{suffix}", dtype=_DT[dtype],
                    provider=provider, ms=ms, ms_p20=p20, ms_p80=p80, tflops=tflops,
                    pct_of_ceiling=None if not ceiling else 100.0 * tflops / ceiling,
                    peak_mem_mb=peak_mem_mb(fn), command=command, tokens_per_s=B * N / (ms * 1e-3),
                    paths=paths, max_abs_diff_vs_sdpa=diff)
                add(row)
                print({k: row[k] for k in ("shape", "provider", "pass", "ms", "tflops", "paths")}, flush=True)
            model.zero_grad(set_to_none=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="llama,siglip")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny models, fp32, Triton interpreter")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; a temp dir with --dry)")
    ap.add_argument("--ceilings", default=None, help="a ceilings result file (default: measure them)")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    if any(c not in ("llama", "siglip") for c in cases):
        print(f"bench_hf: --cases: expected a comma list of llama, siglip, got {args.cases!r}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not (cuda or args.dry):
        print("bench_hf: no CUDA device; use --dry for a CPU plumbing check", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_INTERPRET", "0" if cuda else "1")    # before aimv2.kernels' @triton.jit
    from _common import finish, load_ceilings, measure_ceilings, result_file
    ceilings = (load_ceilings(args.ceilings) if args.ceilings else measure_ceilings()) if cuda else {}
    results = result_file("hf", args.out, args.dry, ceilings)
    command = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv)))
    # bf16 on a GPU; fp32 in the interpreter (its bf16 tl.dot is broken)
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    try:
        for case in cases:
            run_case(case, device, dtype, set(args.providers.split(",")), ceilings, command, results.add,
                     dry=args.dry or not cuda)
    except KeyboardInterrupt:
        return finish(results, interrupted=True)
    return finish(results)


if __name__ == "__main__":
    sys.exit(main())
