"""The AIMv2 model (method.md §1-§4): a ViT encoder with prefix attention and a causal multimodal decoder.

    images (B, C, S, S) -> AIMv2Encoder -> (B, N, D)                       N = (S / 14)^2
    native (method.md §8): images (B, C, H, W) -> (B, (H/14)(W/14), D); images of many sizes ->
    AIMv2Encoder.forward_packed -> one (h_s w_s, D) per image, computed as one packed sequence
    [Linear(D -> Dd)(enc tokens) | CLS | text tokens] -> causal decoder -> pixel head, text head
    loss = 0.4 * patch-normalised l2 (shifted by one, prefix excluded) + 1.0 * caption cross-entropy
    packed (method.md §8): AIMv2Pretrainer.forward_packed(PackedBatch) runs the same per image inside
    one packed sequence, both losses token-weighted over the pack

Module names follow Apple's ml-aim checkpoints (`preprocessor.*`, `trunk.blocks.b.*`), so those load
by name; `aimv2.weights` maps the transformers and timm layouts onto them.
`cfg.impl` picks the norm / SwiGLU / pixel-loss / text-loss implementation ("torch" references or the
fused Triton kernels of `aimv2.kernels`); `cfg.attn_backend` picks the attention ("sdpa" | "flex" | "triton").
The text head belongs to the pretrainer (`text_head.weight`): with impl="triton" it is applied inside
the fused linear + cross-entropy, so the (B, T, V) logits are never materialised.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from aimv2 import kernels as K
from aimv2.attention import AttentionMask, PackedAttentionMask
from aimv2.config import ModelConfig
from aimv2.packing import PackedBatch, decoder_layout
from aimv2.pos_embed import resize_table, sincos_2d


# ----------------------------------------------------------------------------- input checks
def check_images(images, cfg: ModelConfig) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images: expected a tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor (normalised pixels), got {images.dtype}")
    if cfg.native:
        p = cfg.patch_size
        if (images.dim() != 4 or images.shape[1] != cfg.in_chans or images.shape[2] % p or images.shape[3] % p
                or images.shape[2] == 0 or images.shape[3] == 0):
            raise ValueError(f"images: expected shape (B, {cfg.in_chans}, H, W) with H, W positive multiples "
                             f"of the patch size {p} for native {cfg.name}, got {tuple(images.shape)}")
        return
    exp = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != exp:
        raise ValueError(f"images: expected shape (B, {exp[0]}, {exp[1]}, {exp[2]}) for {cfg.name}, "
                         f"got {tuple(images.shape)}")


def check_prefix_len(prefix_len, B: int, N: int, device):
    """None | int in [0, N] | int tensor (B,). Values of a CPU tensor are range-checked (no GPU sync)."""
    if prefix_len is None:
        return None
    if isinstance(prefix_len, bool):
        raise ValueError("prefix_len: expected None, an int or an int tensor, got a bool")
    if isinstance(prefix_len, int):
        if not 0 <= prefix_len <= N:
            raise ValueError(f"prefix_len: {prefix_len} outside [0, N={N}]")
        return prefix_len
    if not isinstance(prefix_len, torch.Tensor):
        raise ValueError(f"prefix_len: expected None, an int or an int tensor, got {type(prefix_len).__name__}")
    if prefix_len.is_floating_point() or prefix_len.dtype == torch.bool or prefix_len.is_complex():
        raise ValueError(f"prefix_len: expected an integer tensor, got {prefix_len.dtype}")
    if tuple(prefix_len.shape) != (B,):
        raise ValueError(f"prefix_len: expected shape ({B},), got {tuple(prefix_len.shape)}")
    if prefix_len.device.type == "cpu" and prefix_len.numel() and not torch.compiler.is_compiling():
        lo, hi = int(prefix_len.min()), int(prefix_len.max())
        if lo < 0 or hi > N:
            raise ValueError(f"prefix_len: values must lie in [0, N={N}], got min {lo}, max {hi}")
    return prefix_len.to(device=device)


def check_text(text, B: int, cfg: ModelConfig) -> None:
    if not isinstance(text, torch.Tensor) or text.is_floating_point() or text.dtype == torch.bool:
        raise ValueError(f"text: expected an integer tensor of token ids, got "
                         f"{getattr(text, 'dtype', type(text).__name__)}")
    if tuple(text.shape) != (B, cfg.text_len):
        raise ValueError(f"text: expected shape ({B}, {cfg.text_len}), got {tuple(text.shape)}")
    if text.device.type == "cpu" and text.numel() and not torch.compiler.is_compiling():
        lo, hi = int(text.min()), int(text.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"text: token ids must lie in [0, vocab_size={cfg.vocab_size}), "
                             f"got min {lo}, max {hi}")


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """RMSNorm over the last dim; `add_forward` fuses the residual add of a pre-norm block."""

    def __init__(self, dim: int, eps: float, impl: str = "torch"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.impl = eps, impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = K.rms_norm if self.impl == "triton" else K.rms_norm_ref
        return fn(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        """Returns (rms_norm(x + residual), x + residual); residual None means s = x."""
        if residual is None:
            return self(x), x
        fn = K.rms_norm if self.impl == "triton" else K.rms_norm_ref
        return fn(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask) -> torch.Tensor:
        if x.dim() == 2:                                                    # packed (T, D), PackedAttentionMask
            T, D = x.shape
            qkv = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads)   # (T, 3, H, Dh)
            return self.proj(mask.qkvpacked(qkv).reshape(T, D))            # (T, H, Dh) -> (T, D)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)   # (B, N, 3, H, Dh)
        o = mask.qkvpacked(qkv)                                             # (B, H, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class SwiGLUFFN(nn.Module):
    """fc2(silu(fc1(x)) * fc3(x)), no biases.

    `fused_fc13`: fc1 and fc3 as ONE (D -> 2H) GEMM on their concatenated weights, its (..., 2H) output
    fed to `swiglu_packed` (whose backward returns one (..., 2H) gradient), so the backward is one GEMM
    for d_x (no add of two (..., D) gradients) and one for both weights. The parameters and state dict
    stay fc1 / fc3; the concatenation copies 2·H·D weights per forward (for AIMv2-L ~11.5 MB a block in
    bf16, against ~185 MB of activations at B=128). NOTE: not measured on a GPU yet; bench_step's
    `aimv2_fc13` recipe is the row that decides the default."""

    def __init__(self, dim: int, hidden: int, impl: str = "torch", fused_fc13: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)
        self.impl = impl
        self.fused_fc13 = fused_fc13

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_fc13:
            h = F.linear(x, torch.cat([self.fc1.weight, self.fc3.weight]))   # (..., 2H) = [fc1(x) | fc3(x)]
            act = K.swiglu_packed if self.impl == "triton" else K.swiglu_packed_ref
            return self.fc2(act(h))
        act = K.swiglu if self.impl == "triton" else K.swiglu_ref
        return self.fc2(act(self.fc1(x), self.fc3(x)))


class Block(nn.Module):
    """Pre-norm block carrying the residual stream: returns (branch output, residual)."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float, impl: str, fused_fc13: bool = False):
        super().__init__()
        self.norm_1 = RMSNorm(dim, eps, impl)
        self.attn = Attention(dim, heads)
        self.norm_2 = RMSNorm(dim, eps, impl)
        self.mlp = SwiGLUFFN(dim, hidden, impl, fused_fc13)

    def forward(self, x, residual, mask: AttentionMask):
        h, residual = self.norm_1.add_forward(x, residual)
        h, residual = self.norm_2.add_forward(self.attn(h, mask), residual)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, hidden, eps, impl, final_norm_name: str, fused_fc13: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, eps, impl, fused_fc13) for _ in range(depth))
        self.final_norm_name = final_norm_name
        self.add_module(final_norm_name, RMSNorm(dim, eps, impl))

    def forward(self, x: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        residual = None
        for blk in self.blocks:
            x, residual = blk(x, residual, mask)
        return getattr(self, self.final_norm_name).add_forward(x, residual)[0]


class Patchifier(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p, bias=True)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.impl)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)                   # (B, N, D)
        return self.norm(x)

    def forward_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Packed patches (T, p*p*C) in `kernels.patchify` order (row, col, channel) -> normed (T, D):
        the conv weight (D, C, p, p) applied as a Linear (one parameter set for both paths)."""
        w = self.proj.weight                                                # (D, C, p, p)
        x = F.linear(patches, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias)
        return self.norm(x)


class Preprocessor(nn.Module):
    """Patch embedding + position embedding. The learned (1, N, D) table `pos_embed` exists unless the
    config is native with sin-cos positions (method.md §8), which have no parameters."""

    _SINCOS_CACHE = 32                       # grids kept per module (serving sees a few aspect ratios)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patchifier = Patchifier(cfg)
        if cfg.native and cfg.native_pos == "sincos":
            self.register_parameter("pos_embed", None)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))  # (1, N, D)
        self._sincos: dict = {}

    def pos_embed_for(self, h: int, w: int, device, dtype) -> torch.Tensor:
        """(h*w, D) position embedding of an h x w patch grid: the sin-cos one (cached per grid, device,
        dtype) or the learned table resized to the grid (the table itself at its own grid). A
        non-native encoder only knows its own grid."""
        cfg = self.cfg
        if self.pos_embed is None:
            key = (h, w, torch.device(device), dtype)
            pe = self._sincos.pop(key, None)
            if pe is None:
                pe = sincos_2d(h, w, cfg.dim, device=device, dtype=dtype)
            self._sincos[key] = pe                                          # most recent last
            while len(self._sincos) > self._SINCOS_CACHE:
                self._sincos.pop(next(iter(self._sincos)))
            return pe
        if not cfg.native and (h, w) != (cfg.grid, cfg.grid):
            raise ValueError(f"patch grid {h}x{w}: this {cfg.name} encoder is not native and only takes its "
                             f"own {cfg.grid}x{cfg.grid} grid ({cfg.img_size} px); build it with native=True")
        return resize_table(self.pos_embed, (h, w))[0].to(dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.cfg.native:
            return self.patchifier(images) + self.pos_embed
        p = self.cfg.patch_size
        x = self.patchifier(images)                                         # (B, h*w, D)
        return x + self.pos_embed_for(images.shape[2] // p, images.shape[3] // p, x.device, x.dtype)

    def forward_packed(self, patches: torch.Tensor, grids) -> torch.Tensor:
        """Packed patches (T, p*p*C) over `grids` -> (T, D) tokens with each image's position embedding."""
        x = self.patchifier.forward_patches(patches)                        # (T, D)
        pe = [self.pos_embed_for(h, w, x.device, x.dtype) for h, w in grids]
        return x + (pe[0] if len(pe) == 1 else torch.cat(pe))


# ----------------------------------------------------------------------------- encoder
class AIMv2Encoder(nn.Module):
    """ViT trunk: forward(images (B, C, S, S), prefix_len=None) -> (B, N, D), final-normed.

    prefix_len: None (bidirectional, inference), an int, or an int tensor (B,) in [0, N].
    Native configs (method.md §8) take (B, C, H, W) of any H, W multiples of the patch size, and
    `forward_packed` runs images of different sizes as one packed sequence.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Transformer(cfg.dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps,
                                 cfg.impl, "post_trunk_norm", cfg.fused_fc13)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """method.md §1 init: xavier-uniform Linear and (flattened) conv weights, zero conv bias, norms 1,
        position embedding N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        proj = self.preprocessor.patchifier.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        if self.preprocessor.pos_embed is not None:
            nn.init.normal_(self.preprocessor.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor, prefix_len=None) -> torch.Tensor:
        cfg = self.cfg
        check_images(images, cfg)
        B, N = images.shape[0], cfg.num_patches
        if cfg.native:
            N = (images.shape[2] // cfg.patch_size) * (images.shape[3] // cfg.patch_size)
        prefix_len = check_prefix_len(prefix_len, B, N, images.device)
        x = self.preprocessor(images)                                       # (B, N, D)
        mask = AttentionMask(cfg.attn_backend, prefix_len, B, N, images.device)
        return self.trunk(x, mask)

    def pack(self, images, prefix_len=None):
        """A list of (C, H, W) images (H, W multiples of the patch size, sizes may differ) -> PackedBatch."""
        from aimv2.packing import pack_images
        return pack_images(images, self.cfg.patch_size, prefix_len=prefix_len)

    def forward_packed(self, batch, prefix_len=None, *, packed_output: bool = False):
        """Images of different sizes through the encoder as ONE packed sequence (method.md §8).

        batch: an `aimv2.packing.PackedBatch` (patches (T, p*p*C), cu_seqlens, grids) or a list of
          (C, H, W) image tensors, packed here (`pack_images`). Moved to the encoder's device if needed.
        prefix_len: per-image prefix lengths, an int tensor or list (n,) with P_s in [0, h_s*w_s];
          None takes batch.prefix_len (None there too: bidirectional, inference).
        Returns a list of n (h_s*w_s, D) tensors (row-major over each image's patch grid; views of one
        packed tensor), or with packed_output=True the packed (T, D) itself (rows cu_seqlens[s] :
        cu_seqlens[s+1] are image s; `aimv2.packing.unpack(out, batch.grids)` splits it).

        Each image's output equals `forward(image[None], prefix_len=P_s)` of a native encoder (up to
        float summation order): no token attends across images. Attention: "triton" runs
        `kernels.prefix_attention_varlen` once per block over the whole pack; "sdpa" loops over the
        images; "flex" uses one document block mask over the pack.
        """
        from dataclasses import replace

        from aimv2.packing import PackedBatch, pack_images
        cfg = self.cfg
        if not isinstance(batch, PackedBatch):
            if isinstance(batch, torch.Tensor) and batch.dim() == 4:
                batch = list(batch)
            if not isinstance(batch, (list, tuple)):
                raise ValueError(f"forward_packed: expected a PackedBatch or a list of (C, H, W) images, "
                                 f"got {type(batch).__name__}")
            batch = pack_images(batch, cfg.patch_size)
        if batch.patches.shape[1] != cfg.patch_dim:
            raise ValueError(f"forward_packed: patches have {batch.patches.shape[1]} values, {cfg.name} expects "
                             f"p*p*C = {cfg.patch_dim}")
        if prefix_len is not None:
            if not isinstance(prefix_len, torch.Tensor):
                prefix_len = torch.as_tensor(prefix_len, dtype=torch.int64)
            batch = replace(batch, prefix_len=prefix_len)                   # validated by PackedBatch
        device = self.preprocessor.patchifier.proj.weight.device
        if batch.patches.device != device or batch.cu_seqlens.device != device:
            batch = batch.to(device)
        x = self.preprocessor.forward_packed(batch.patches, batch.grids)   # (T, D)
        mask = PackedAttentionMask(cfg.attn_backend, batch.cu_seqlens, batch.lengths, batch.prefix_len, device)
        out = self.trunk(x, mask)                                           # (T, D)
        if packed_output:
            return out
        from aimv2.packing import unpack
        return unpack(out, batch.grids)


# ----------------------------------------------------------------------------- decoder
class AIMv2Decoder(nn.Module):
    """Causal multimodal decoder (method.md §3) over [proj(image tokens) | CLS | t_1 .. t_77]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dec_dim
        self.proj = nn.Linear(cfg.dim, d, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.text_embed = nn.Embedding(cfg.vocab_size, d)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, cfg.text_len + 1, d))     # over [CLS, t_1..t_77]
        self.trunk = Transformer(d, cfg.dec_depth, cfg.dec_heads, cfg.dec_mlp_hidden, cfg.norm_eps,
                                 cfg.impl, "norm", cfg.fused_fc13)
        self.pixel_head = nn.Linear(d, cfg.patch_dim, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.text_embed.weight, std=0.02)
        nn.init.normal_(self.text_pos_embed, std=0.01)

    def forward(self, enc_tokens: torch.Tensor, text: torch.Tensor):
        """enc_tokens (B, N, D), text (B, T) -> pixel predictions (B, N, p*p*C), text hidden states
        (B, T, Dd) (final-normed; the pretrainer's text head maps them to the vocabulary).

        Pixel output i predicts patch i+1; text output at CLS predicts t_1, at t_k predicts t_{k+1}
        (the output at t_T is dropped)."""
        B, N, _ = enc_tokens.shape
        T = self.cfg.text_len
        img = self.proj(enc_tokens)                                          # (B, N, Dd)
        x = torch.cat([img, self._text_tokens(text, img.dtype)], dim=1)     # (B, N+T+1, Dd)
        mask = AttentionMask(self.cfg.attn_backend, 0, B, N + T + 1, x.device)
        x = self.trunk(x, mask)
        return self.pixel_head(x[:, :N]), x[:, N:N + T]

    def _text_tokens(self, text: torch.Tensor, dtype) -> torch.Tensor:
        """text (B, T) ids -> (B, T+1, Dd): [CLS, t_1 .. t_T] embeddings plus their position table."""
        txt = torch.cat([self.cls_token.expand(text.shape[0], -1, -1).to(dtype),
                         self.text_embed(text).to(dtype)], dim=1)             # (B, T+1, Dd)
        return txt + self.text_pos_embed.to(dtype)

    def forward_packed(self, enc: torch.Tensor, batch):
        """The decoder over a packed batch (method.md §8): enc (T_img, D) the packed encoder output of
        `batch` (an aimv2.packing.PackedBatch with text (n, T)) -> pixel predictions (T_img, p*p*C)
        packed like batch.patches (row r predicts row r+1 of its image) and text hidden (n, T, Dd).

        Image s runs as its own [proj(enc_s) (N_s) | CLS | t_1 .. t_T] sequence, the n of them packed
        into one (T_img + n (T+1), Dd) sequence that is causal within each image and never attends
        across images, so each image's outputs are forward(enc_s[None], text[s:s+1])'s. The layout
        comes from cu_seqlens on the device (aimv2.packing.decoder_layout): no host sync."""
        T = self.cfg.text_len
        lay = decoder_layout(batch.cu_seqlens, batch.lengths, T + 1)
        img = self.proj(enc)                                                 # (T_img, Dd)
        txt = self._text_tokens(batch.text, img.dtype)                      # (n, T+1, Dd)
        x = torch.cat([img, txt.flatten(0, 1)]).index_select(0, lay.gather)  # (T_img + n(T+1), Dd)
        mask = PackedAttentionMask(self.cfg.attn_backend, lay.cu_seqlens, lay.lengths, 0, x.device)   # causal
        x = self.trunk(x, mask)
        # index_select (backward: index_add_ onto distinct rows) rather than x[idx], whose backward,
        # an accumulating index_put_, sorts the indices
        text_rows = lay.extra_rows[:, :T].flatten()                          # (n T,) CLS .. t_{T-1}
        return (self.pixel_head(x.index_select(0, lay.image_rows)),
                x.index_select(0, text_rows).view(-1, T, x.shape[-1]))


def text_loss_fn(logits: torch.Tensor, text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Mean fp32 cross-entropy over non-padding targets; logits (B, T, V) predict text (B, T)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), text.flatten(), reduction="none")  # (B*T,)
    valid = (text.flatten() != pad_id).to(ce.dtype)
    return (ce * valid).sum() / valid.sum().clamp(min=1.0)


def _old_text_head_keys(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: checkpoints written before the text head moved out of the decoder
    name it `decoder.text_head.weight`; rename it to `text_head.weight`."""
    old, new = prefix + "decoder.text_head.", prefix + "text_head."
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict.setdefault(new + k[len(old):], state_dict.pop(k))


class AIMv2Pretrainer(nn.Module):
    """Encoder + decoder + text head + losses:
    forward(images, text, prefix_len) -> dict(loss, pixel_loss, text_loss);
    forward_packed(PackedBatch) -> the same over images of different sizes (method.md §8).

    The text head (Linear(Dd -> V), no bias) lives here, not in the decoder, so that the text loss can
    fuse it: impl="triton" runs `aimv2.kernels.linear_cross_entropy` (no (B, T, V) logits), impl="torch"
    its reference (F.linear, then fp32 cross-entropy). Under FSDP the root module owns it, so its
    weight is unsharded for the whole forward. The total loss is differentiable and computed without
    host syncs (token-weighted means are device-side divisions)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.encoder = AIMv2Encoder(cfg)
        self.decoder = AIMv2Decoder(cfg)
        self.text_head = nn.Linear(cfg.dec_dim, cfg.vocab_size, bias=False)
        nn.init.xavier_uniform_(self.text_head.weight)
        self.register_load_state_dict_pre_hook(_old_text_head_keys)

    def text_logits(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, Dd) decoder text outputs -> (B, T, V) logits (evaluation and inspection only; the
        training loss never builds them under impl="triton")."""
        return self.text_head(text_hidden)

    def forward(self, images, text: torch.Tensor | None = None, prefix_len=None) -> dict:
        """images (B, C, S, S) (native: (B, C, H, W), one size per batch), text (B, T), prefix_len (None:
        bidirectional, int, or (B,)) -> losses; or a PackedBatch alone -> forward_packed(batch) (so DDP /
        FSDP, which wrap forward, see both)."""
        if isinstance(images, PackedBatch):
            return self.forward_packed(images)
        cfg = self.cfg
        check_images(images, cfg)
        check_text(text, images.shape[0], cfg)
        N = (images.shape[2] // cfg.patch_size) * (images.shape[3] // cfg.patch_size)   # cfg.num_patches unless native
        prefix_len = check_prefix_len(prefix_len, images.shape[0], N, images.device)
        enc = self.encoder(images, prefix_len)                               # (B, N, D)
        pixels, text_hidden = self.decoder(enc, text)                       # (B, N, p*p*C), (B, T, Dd)
        plen = N if prefix_len is None else prefix_len
        loss_fn = K.patch_l2_loss if cfg.impl == "triton" else K.patch_l2_loss_ref
        pixel_loss = loss_fn(pixels, images, plen, cfg.patch_size, cfg.patch_norm_eps)
        return self._losses(pixel_loss, text_hidden, text)

    def forward_packed(self, batch) -> dict:
        """Pre-training on a pack of images of different sizes (method.md §8): batch an
        aimv2.packing.PackedBatch with text (n, T) -> dict(loss, pixel_loss, text_loss).

        Each image is encoded with its own prefix P_s (`AIMv2Encoder.forward_packed`) and decoded as its
        own [image | CLS | text] sequence (`AIMv2Decoder.forward_packed`), all in one packed sequence.
        Both losses are token-weighted over the whole pack as forward()'s are over the batch: the pixel
        loss averages every (prediction, next patch of the same image) pair past each image's prefix
        (`kernels.patch_l2_loss_packed`, targets = batch.patches), the text loss every non-padding
        caption token. prefix_len None (bidirectional) counts no pixel pair, as in forward()."""
        cfg = self.cfg
        if batch.text is None:
            raise ValueError("batch.text: the packed pre-training forward needs captions (n, T), got None")
        check_text(batch.text, batch.num_images, cfg)
        device = self.text_head.weight.device
        if batch.patches.device != device or batch.cu_seqlens.device != device:
            batch = batch.to(device)
        enc = self.encoder.forward_packed(batch, packed_output=True)        # (T_img, D)
        pixels, text_hidden = self.decoder.forward_packed(enc, batch)       # (T_img, p*p*C), (n, T, Dd)
        cu = batch.cu_seqlens
        plen = cu[1:] - cu[:-1] if batch.prefix_len is None else batch.prefix_len
        loss_fn = K.patch_l2_loss_packed if cfg.impl == "triton" else K.patch_l2_loss_packed_ref
        pixel_loss = loss_fn(pixels, batch.patches, cu, plen, cfg.patch_norm_eps)
        return self._losses(pixel_loss, text_hidden, batch.text)

    def _losses(self, pixel_loss: torch.Tensor, text_hidden: torch.Tensor, text: torch.Tensor) -> dict:
        """The text loss (text head fused with the cross-entropy under impl="triton") and the total."""
        cfg = self.cfg
        ce_fn = K.linear_cross_entropy if cfg.impl == "triton" else K.linear_cross_entropy_ref
        text_loss = ce_fn(text_hidden, self.text_head.weight, text, ignore_index=cfg.pad_id)
        loss = cfg.pixel_loss_weight * pixel_loss + cfg.text_loss_weight * text_loss
        return {"loss": loss, "pixel_loss": pixel_loss, "text_loss": text_loss}


# ----------------------------------------------------------------------------- accounting
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@functools.lru_cache(maxsize=4096)                     # native packs ask per image size, every step
def _prefix_pairs(N: int) -> float:
    """Expected unmasked (query, key) pairs of the prefix mask with P ~ U{1, ..., N-1}."""
    if N < 2:
        return float(N * N)
    tot = 0
    for P in range(1, N):
        tot += P * P + (N * (N + 1) - P * (P + 1)) // 2     # prefix rows see P keys; row i >= P sees i+1
    return tot / (N - 1)


def forward_flops(cfg: ModelConfig, prefix: str = "random", num_patches: int | None = None) -> dict:
    """Forward matmul FLOPs per image (2 per multiply-add), by part.

    prefix: "random" (training, P ~ U{1..N-1}), "none" (bidirectional inference) or "causal".
    num_patches: N of this image (native resolution, method.md §8: its own grid), default cfg's.
    Attention counts only the unmasked (i, j) pairs: 4 * head_dim * heads per pair (QK^T and PV)."""
    N = cfg.num_patches if num_patches is None else num_patches
    D, T = cfg.dim, cfg.text_len
    Dd, L = cfg.dec_dim, N + cfg.text_len + 1
    enc_pairs = {"random": _prefix_pairs(N), "none": float(N * N), "causal": N * (N + 1) / 2}[prefix]

    def blocks(tokens, dim, hidden, depth, pairs):
        linear = 2 * tokens * (4 * dim * dim + 3 * dim * hidden)
        return depth * (linear + 4 * dim * pairs)

    out = {
        "patch_embed": 2.0 * N * D * cfg.patch_dim,
        "encoder": float(blocks(N, D, cfg.mlp_hidden, cfg.depth, enc_pairs)),
        "decoder": float(2 * N * D * Dd + blocks(L, Dd, cfg.dec_mlp_hidden, cfg.dec_depth, L * (L + 1) / 2)),
        "heads": 2.0 * N * Dd * cfg.patch_dim + 2.0 * T * Dd * cfg.vocab_size,
    }
    out["total"] = sum(out.values())
    return out


def flops_per_sample(cfg: ModelConfig, num_patches: int | None = None) -> float:
    """Training FLOPs per image (forward + backward = 3x forward), prefix mask's unmasked work only;
    num_patches: an image of N patches (native resolution), default cfg's."""
    return 3.0 * forward_flops(cfg, "random", num_patches)["total"]
