"""Typed model configuration (the presets live in `aimv2.presets`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTN_BACKENDS = ("sdpa", "flex", "triton")
IMPLS = ("torch", "triton")
NATIVE_POS = ("sincos", "interpolate")


def mlp_hidden_for(dim: int) -> int:
    """SwiGLU hidden size of method.md §1: round_up(int(2 * 4D / 3), 256)."""
    h = int(2 * 4 * dim / 3)
    return (h + 255) // 256 * 256


@dataclass
class ModelConfig:
    """AIMv2 encoder + multimodal decoder (method.md §1, §3, §4).

    `attn_backend` picks the attention kernel ("sdpa" | "flex" | "triton"); `impl` picks the
    norm / SwiGLU / pixel-loss implementation ("torch" references or fused "triton" kernels);
    `fused_fc13` computes the MLP's fc1 and fc3 as one GEMM (model.py SwiGLUFFN). None of the three
    changes the parameters: a checkpoint resumes or loads under any of them.

    `native` (method.md §8): images at their own size (H, W any multiples of patch_size, not only
    img_size x img_size), each with the position embedding of its own (H/p, W/p) patch grid, and
    `AIMv2Encoder.forward_packed` for many sizes in one packed sequence. `native_pos` says where that
    embedding comes from: "sincos" (the fixed 2-D sin-cos of Apple's `-native` checkpoints; the encoder
    has no learned table) or "interpolate" (a learned img_size-grid table, e.g. of a `-224` checkpoint,
    bicubic-resized to each image's grid). Without `native` the encoder is the fixed-size one and
    `native_pos` is not read. img_size stays the nominal resolution (learned-table size, FLOPs).
    """
    name: str = "custom"
    # encoder
    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    num_heads: int = 8
    mlp_hidden: int = 2816
    # decoder
    dec_dim: int = 1024
    dec_depth: int = 12
    dec_heads: int = 8
    dec_mlp_hidden: int = 2816
    # text
    vocab_size: int = 32000
    text_len: int = 77
    pad_id: int = 1
    # numerics and losses
    norm_eps: float = 1e-5
    patch_norm_eps: float = 1e-6
    pixel_loss_weight: float = 0.4
    text_loss_weight: float = 1.0
    # backends
    attn_backend: str = "sdpa"
    impl: str = "torch"
    fused_fc13: bool = False    # SwiGLU's fc1 and fc3 as one (D -> 2H) GEMM (same weights and state dict)
    # native resolution (method.md §8)
    native: bool = False
    native_pos: str = "sincos"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d).validate()

    def validate(self) -> "ModelConfig":
        def need(cond, msg):
            if not cond:
                raise ValueError(f"ModelConfig({self.name}): {msg}")
        for f in ("img_size", "patch_size", "in_chans", "dim", "depth", "num_heads", "mlp_hidden",
                  "dec_dim", "dec_depth", "dec_heads", "dec_mlp_hidden", "vocab_size", "text_len"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f"{f} must be a positive int, got {v!r}")
        need(self.img_size % self.patch_size == 0,
             f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        need(self.dim % self.num_heads == 0, f"dim {self.dim} not divisible by num_heads {self.num_heads}")
        need(self.dec_dim % self.dec_heads == 0,
             f"dec_dim {self.dec_dim} not divisible by dec_heads {self.dec_heads}")
        need(0 <= self.pad_id < self.vocab_size, f"pad_id {self.pad_id} outside [0, {self.vocab_size})")
        need(self.attn_backend in ATTN_BACKENDS,
             f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        need(self.impl in IMPLS, f"impl must be one of {IMPLS}, got {self.impl!r}")
        need(isinstance(self.fused_fc13, bool), f"fused_fc13 must be true or false, got {self.fused_fc13!r}")
        need(self.norm_eps > 0 and self.patch_norm_eps > 0, "eps values must be > 0")
        need(isinstance(self.native, bool), f"native must be a bool, got {self.native!r}")
        need(self.native_pos in NATIVE_POS, f"native_pos must be one of {NATIVE_POS}, got {self.native_pos!r}")
        need(not (self.native and self.native_pos == "sincos" and self.dim % 4),
             f"native sin-cos position embedding needs dim divisible by 4, got {self.dim}")
        return self
