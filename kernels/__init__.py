"""aimv2.kernels: standalone Triton kernels for AIMv2 (never imports model, data or training code).

Ops (each with a plain-PyTorch `<op>_ref`):
- rms_norm(x, weight, eps, residual=None)     fused RMSNorm (+ residual add)
- swiglu(gate, up)                            silu(gate) * up
- swiglu_packed(h)                            the same on h = [gate | up] (one fc1/fc3 GEMM's output)
- patch_l2_loss(pred, images, prefix_len, p)  AIMv2 patch-normalised l2 pixel loss
- patch_l2_loss_packed(pred, patches, cu_seqlens, prefix_len)
                                              the same over images of different sizes packed in one sequence
- prefix_attention(q, k, v, prefix_len)       prefix-causal flash attention
- prefix_attention_qkvpacked(qkv, prefix_len) the same on one (B, N, 3, H, D) projection output (one d_qkv)
- prefix_attention_varlen(q, k, v, cu_seqlens, max_seqlen, prefix_len)
                                              the same over images of different sizes packed in one sequence
- prefix_attention_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, prefix_len)
                                              the same on one (T, 3, H, D) projection output (one d_qkv)
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
    from .prefix_attention import (ATTENTION_HEAD_DIMS, prefix_attention, prefix_attention_qkvpacked,
                                   prefix_attention_ref, prefix_mask)
    from .prefix_attention_varlen import (prefix_attention_varlen, prefix_attention_varlen_qkvpacked,
                                          prefix_attention_varlen_ref)
    from .rms_norm import rms_norm, rms_norm_ref
    from .swiglu import swiglu, swiglu_packed, swiglu_packed_ref, swiglu_ref
else:
    # This folder was imported as a top-level package because a checkout's root is on sys.path
    # (`python -c`, `python -m`, pytest's rootdir insertion). Under the name `kernels` that shadows
    # Hugging Face's `kernels` library, which transformers (>= 5.2x) imports: hand over to the
    # installed package of that name, found with the checkout root left out of the search path, as
    # setuptools' `_distutils_hack` does for `distutils`. When none is installed (or under any other
    # name) stay inert: registering the torch.library ops a second time from this copy would silently
    # replace the implementations that `aimv2.kernels` registered.
    def _hand_over_to_installed(name: str) -> bool:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.realpath(__file__))
        root = os.path.dirname(here)

        def _is_root(entry) -> bool:
            return isinstance(entry, str) and os.path.realpath(entry or os.getcwd()) == root

        spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if not _is_root(p)])
        if spec is None or spec.loader is None or (spec.origin and os.path.dirname(os.path.realpath(spec.origin)) == here):
            return False
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module          # the import statement returns sys.modules[name]
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return True

    if not (__name__ == "kernels" and _hand_over_to_installed(__name__)):
        __version__ = "N/A"
    del _hand_over_to_installed
