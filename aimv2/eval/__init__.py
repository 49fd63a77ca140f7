"""Evaluation and serving for AIMv2 encoders.

- `aimv2.eval.probe`:    attentive probe on a frozen trunk (method.md §6): `run_probe(...)`, `aimv2 probe`.
- `aimv2.eval.embed`:    encoder features for a folder of images or shards: `embed(...)`, `aimv2 embed`.
- `aimv2.eval.hub`:      `from_pretrained(path)`: released weights with the fastest backend for the device.
- `aimv2.eval.hf_patch`: `patch_transformers(model)`: our kernels inside a transformers `Aimv2VisionModel`.

Submodules are imported on demand (nothing here imports triton).
"""
