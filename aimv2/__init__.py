"""aimv2: a kernel-optimized training core for AIMv2 vision encoders.

    import aimv2
    enc = aimv2.from_pretrained("path/to/aimv2-large-patch14-224")   # local Apple / HF / timm weights
    feats = enc(images)                                                # (B, N, D)

Sub-packages: aimv2.kernels (standalone Triton kernels), aimv2.model, aimv2.data, aimv2.train,
aimv2.eval, aimv2.weights.
"""
__version__ = "0.1.0"

__all__ = ["from_pretrained", "patch_transformers", "__version__"]


def __getattr__(name):          # lazy: `import aimv2` stays cheap and never imports triton
    if name == "from_pretrained":
        from aimv2.eval.hub import from_pretrained
        return from_pretrained
    if name == "patch_transformers":
        from aimv2.eval.hf_patch import patch_transformers
        return patch_transformers
    raise AttributeError(f"module 'aimv2' has no attribute {name!r}")
