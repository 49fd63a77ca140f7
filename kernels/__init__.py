"""aimv2.kernels: standalone Triton kernels for AIMv2 (never imports model, data or training code).

Ops (each with a plain-PyTorch `<op>_ref`):
- rms_norm(x, weight, eps, residual=None)     fused RMSNorm (+ residual add)
- swiglu(gate, up)                            silu(gate) * up
- swiglu_packed(h)                            the same on h = [gate | up] (one fc1/fc3 GEMM's output)
- patch_l2_loss(pred, images, prefix_len, p)  AIMv2 patch-normalised l2 pixel loss
- patch_l2_loss_packed(pred, patches, cu_seqlens, prefix_len)
                                              the same over images of different sizes packed in one sequence
- prefix_attention(q, k, v, prefix_len)       prefix-causal flash attention
- prefix_attention_varlen(q, k, v, cu_seqlens, max_seqlen, prefix_len)
                                              the same over images of different sizes packed in one sequence
- linear_cross_entropy(hidden, weight, target) fused linear + cross-entropy, no (T, V) logits

Without triton (setup.py installs it on Linux only) the package still imports: the references,
`prefix_mask` and `patchify` work, and the ops raise `TritonUnavailableError` naming the reason.
- unavailable_reason(device=None, dtype=None)  None when the kernels can run there, else why not
- ATTENTION_HEAD_DIMS                         head dims D that prefix_attention supports
"""
if __name__ == "aimv2.kernels":
    from ._compat import TritonUnavailableError
    from ._utils import unavailable_reason
    from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
    from .patch_l2_loss import patch_l2_loss, patch_l2_loss_ref, patchify
    from .patch_l2_loss_packed import patch_l2_loss_packed, patch_l2_loss_packed_ref
    from .prefix_attention import ATTENTION_HEAD_DIMS, prefix_attention, prefix_attention_ref, prefix_mask
    from .prefix_attention_varlen import prefix_attention_varlen, prefix_attention_varlen_ref
    from .rms_norm import rms_norm, rms_norm_ref
    from .swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
else:
    # This folder was imported as a top-level `kernels` package because a checkout's root is on
    # sys.path (e.g. transformers probes for the Hugging Face `kernels` library by importing that
    # name). Stay inert: registering the torch.library ops a second time from this copy would
    # silently replace the implementations that `aimv2.kernels` registered.
    __version__ = "N/A"
