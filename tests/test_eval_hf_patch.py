"""`aimv2.patch_transformers`: a small random transformers Aimv2VisionModel / Aimv2Model with our Triton
kernels swapped in (interpreter on the CPU, fp32) gives the unpatched outputs and gradients within
tolerance, keeps its weights, and falls back where the kernels would compute something else.

Tolerance: fp32 kernels against fp32 PyTorch differ only in summation order (~1e-6 relative over two
layers); a wrong eps, scale, missing residual or wrong activation is >= 1e-3 relative. We allow 2e-5."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel  # noqa: E402

import aimv2  # noqa: E402
import aimv2.hf  # noqa: E402
from aimv2.eval.hf_patch import patch_transformers  # noqa: E402

TOL = 2e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the Triton interpreter (conftest)


def _vision_cfg(layers=2, image=42, attn="sdpa", use_head=False):
    c = Aimv2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=2,
                          image_size=image, patch_size=14, rms_norm_eps=1e-5, use_head=use_head)
    c._attn_implementation = attn
    return c


def _close(a, b, what):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= TOL * scale, f"{what}: max err {err:.3e} > {TOL} x {scale:.3e}"


def _nontrivial_norms(model):
    with torch.no_grad():                  # RMSNorm weights are 1 at init: make them matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)


def test_vision_model_outputs_match_and_weights_are_shared():
    torch.manual_seed(0)
    m = Aimv2VisionModel(_vision_cfg()).to(DEVICE).eval()
    _nontrivial_norms(m)
    x = torch.randn(2, 3, 42, 42, device=DEVICE)
    with torch.no_grad():
        ref = m(x, output_hidden_states=True)
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    assert aimv2.patch_transformers(m) is m
    patch_transformers(m)                                                  # idempotent
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == ptrs   # same tensors, same keys
    patched = [n for n, mod in m.named_modules() if "forward" in vars(mod)]
    # 1 patch-embedding norm + 2 per layer + final norm, 1 MLP and the layer per layer; the attention
    # runs through transformers' attention interface ("aimv2", aimv2.hf)
    assert len(patched) == 1 + 2 * 2 + 1 + 2 * 2, patched
    assert m.config._attn_implementation == "aimv2"
    aimv2.hf.reset_counts()
    with torch.no_grad():
        out = m(x, output_hidden_states=True)
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    assert aimv2.hf.counts() == {"kernel": 2}                              # one per layer, no fallback
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _close(a, b, f"hidden_states[{i}]")


def test_vision_model_gradients_match():
    torch.manual_seed(1)
    m = Aimv2VisionModel(_vision_cfg(layers=1, image=28)).to(DEVICE).train()
    _nontrivial_norms(m)
    x = torch.randn(2, 3, 28, 28, device=DEVICE)
    w = torch.randn(2, 4, 64, device=DEVICE)

    def grads():
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        (m(xi).last_hidden_state * w).sum().backward()
        return {"pixel_values": xi.grad, **{n: p.grad.clone() for n, p in m.named_parameters()}}

    ref = grads()
    patch_transformers(m)
    got = grads()
    for n in ref:
        assert got[n] is not None and ref[n].abs().max() > 0, n
        _close(got[n], ref[n], f"grad {n}")


def test_attention_weights_requested_fall_back_to_transformers():
    torch.manual_seed(2)
    m = Aimv2VisionModel(_vision_cfg(attn="eager")).to(DEVICE).eval()
    x = torch.randn(1, 3, 42, 42, device=DEVICE)
    with torch.no_grad():
        ref = m(x, output_attentions=True)
        patch_transformers(m)
        out = m(x, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 2, 9, 9)
    for a, b in zip(out.attentions, ref.attentions):
        _close(a, b, "attentions")
    _close(out.last_hidden_state, ref.last_hidden_state, "last_hidden_state")


def test_clip_style_model_image_and_masked_text_features():
    torch.manual_seed(3)
    cfg = Aimv2Config(vision_config=_vision_cfg(layers=1, image=28, use_head=True).to_dict(),
                      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                       eos_token_id=63),
                      projection_dim=32)
    m = Aimv2Model(cfg).to(DEVICE).eval()
    _nontrivial_norms(m)
    px = torch.randn(2, 3, 28, 28, device=DEVICE)
    ids = torch.randint(0, 63, (2, 8), device=DEVICE)
    ids[:, -1] = 63
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[1, 5:] = 0                                  # padding: the text attention keeps transformers' path
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=px, attention_mask=mask)
        patch_transformers(m)
        out = m(input_ids=ids, pixel_values=px, attention_mask=mask)
    _close(out.image_embeds, ref.image_embeds, "image_embeds")
    _close(out.text_embeds, ref.text_embeds, "text_embeds")
    _close(out.logits_per_image, ref.logits_per_image, "logits_per_image")


def test_rejects_other_models():
    with pytest.raises(TypeError, match="Aimv2VisionModel"):
        patch_transformers(torch.nn.Linear(2, 2))


def test_refuses_where_the_kernels_cannot_run(monkeypatch):
    """The patch asks aimv2.kernels.unavailable_reason() and fails up front, naming the reason."""
    import aimv2.kernels as K
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None, dtype=None: "no usable GPU (test)")
    m = Aimv2VisionModel(_vision_cfg(layers=1, image=28))
    with pytest.raises(RuntimeError, match=r"cannot run here: no usable GPU \(test\)"):
        patch_transformers(m)
    assert not any(getattr(mod, "_aimv2_patched", False) for mod in m.modules())
