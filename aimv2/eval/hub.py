"""Released AIMv2 weights as a drop-in encoder with the fastest backend for the device.

    enc = aimv2.from_pretrained("aimv2-large-patch14-224/")        # local Apple-hub / transformers / timm
    feats = enc(images)                                              # images (B, 3, S, S) -> (B, N, D)

Inputs: images at the checkpoint's resolution S (224 for `-224` checkpoints), normalised with the
statistics of the checkpoint's image processor. `img_size=S'` builds the encoder at another resolution:
the learned (N, D) position embedding is resized bicubically on its (S/14, S/14) grid to (S'/14, S'/14)
(done by `aimv2.weights.load_encoder`); quality at S' is best for checkpoints fine-tuned near S'.

Native resolution (`native=True`, method.md §8): images at their own size, each resized so both sides
are multiples of 14, packed into one sequence by `enc.forward_packed(images)` -> one (h*w, D) per image.

Backend ("auto"): on a CUDA device the fused Triton kernels (impl="triton": RMSNorm+residual, SwiGLU;
attn_backend="triton": flash attention with P = N) in bf16; otherwise the PyTorch references with SDPA in
fp32. Every fallback logs its reason on the `aimv2.eval.hub` logger.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


def _triton_unavailable_reason(device: torch.device, explicit: bool, dtype=None) -> str | None:
    """None when the Triton kernels can (and, for "auto", should) run on `device`, else why not.
    "auto" never picks the CPU interpreter; everything else is aimv2.kernels' own check."""
    if device.type == "cpu" and not explicit:
        return "CPU device (the Triton kernels need a GPU; backend='triton' runs them in the interpreter)"
    from aimv2 import kernels
    return kernels.unavailable_reason(device, dtype)


def select_backend(device, backend: str = "auto", dtype=None) -> tuple[str, str, str]:
    """(impl, attn_backend, reason) for `device` (and inputs of `dtype`, when given): ("triton", "triton")
    when usable, else ("torch", "sdpa")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch", "sdpa", "backend='torch' requested"
    why_not = _triton_unavailable_reason(device, explicit=backend == "triton", dtype=dtype)
    if why_not is None:
        return "triton", "triton", f"Triton kernels usable on {device}"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run on {device}: {why_not}")
    if device.type == "cuda":
        log.warning("from_pretrained: falling back to torch/SDPA: %s", why_not)
    return "torch", "sdpa", why_not


def from_pretrained(path, *, img_size: int | None = None, device=None, dtype=None, backend: str = "auto",
                    preset: str | None = None, strict: bool = True, native: bool = False):
    """An `AIMv2Encoder` in eval mode from a local checkpoint (see the module docstring).

    path: a weights file (.safetensors / .pt / .bin), a transformers or Apple-hub directory, a timm file,
    or one of our training checkpoints / run dirs (anything `aimv2.weights.load_encoder` reads).
    img_size: build at another resolution (bicubic position-embedding interpolation); default the
    checkpoint's. device: default "cuda" when available else "cpu". dtype: default bf16 on a GPU, fp32
    otherwise. backend: "auto" | "triton" | "torch". preset: the architecture when the file carries no
    config. native: build the native-resolution encoder (method.md §8): images of any size (H, W
    multiples of 14), `enc.forward_packed(list_of_images)` runs many sizes as one packed sequence
    (Triton varlen attention on a GPU). Apple's `-native` checkpoints map onto it exactly; learned-table
    checkpoints resize their table to each image's grid. Returns the encoder; `enc.cfg` says the
    resolution and backend chosen.
    """
    from aimv2 import kernels
    from aimv2.weights import load_encoder

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    impl, attn, reason = select_backend(device, backend, dtype)
    log.info("from_pretrained: impl=%s attn_backend=%s (%s)", impl, attn, reason)
    extra = {"native": True} if native else {}      # else a checkpoint's own (metadata) choice stands
    enc = load_encoder(path, preset, img_size=img_size, strict=strict, impl=impl, attn_backend=attn, **extra)
    if attn == "triton" and enc.cfg.head_dim not in kernels.ATTENTION_HEAD_DIMS:
        why = f"head dim {enc.cfg.head_dim} not in the Triton attention's {kernels.ATTENTION_HEAD_DIMS}"
        if backend == "triton":
            raise ValueError(f"backend='triton': {why}")
        log.warning("from_pretrained: attention falls back to SDPA: %s", why)
        enc.cfg = enc.cfg.replace(attn_backend="sdpa")          # read at every forward
    return enc.to(device=device, dtype=dtype).eval()
