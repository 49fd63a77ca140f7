"""`attn_implementation="aimv2"` (aimv2.hf.register) in tiny random transformers models against "sdpa":
Aimv2VisionModel, Aimv2Model (image + causal text tower), SiglipVisionModel / SiglipTextModel and
LlamaForCausalLM (GQA), fp32 (the Triton interpreter on a CPU): outputs and every gradient, left and right
padding (the real rows on our varlen kernel, the padded rows that sdpa lets see keys on SDPA), greedy
generation, and aimv2.hf.counts() showing where our kernels ran and where transformers'
path did. Then aimv2.hf.kernelize in both modes.

Numerics (tests/_kernel_numerics.py, flash-attention's rule): truth is the same model with "sdpa" in
fp64 on the same inputs; our fp32 error must be within 2x the fp32 sdpa model's error, plus a floor of
2 fp32 ulps x max|truth|. A wrong mask, scale, causal flag or GQA head mapping is >= 1e-3 relative."""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("kernels")
from transformers import (Aimv2Config, Aimv2Model, Aimv2VisionConfig, Aimv2VisionModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, SiglipTextConfig, SiglipTextModel, SiglipVisionConfig,
                          SiglipVisionModel)

import aimv2.hf  # noqa: E402
from _kernel_numerics import assert_close_to_truth  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: the Triton interpreter (conftest)
NAME = aimv2.hf.register()


def _nontrivial_norms(model):
    with torch.no_grad():                  # norm weights are 1 at init: make them matter
        for n, p in model.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.uniform_(0.5, 1.5)


def _run(model, attn: str, inputs: dict, out_of, weight_of=None, grads: bool = True):
    """out_of(outputs) -> tensors to compare; with grads, sum(out * fixed random weights) is back-propagated
    and every parameter's gradient (and each float input's) comes back too. Returns {name: tensor}."""
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    inputs = {k: (v.detach().clone().requires_grad_(grads) if v.is_floating_point() else v)
              for k, v in inputs.items()}
    with torch.set_grad_enabled(grads):
        outs = out_of(model(**inputs))
    got = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    if grads:
        loss = sum((o * w).sum() for o, w in zip(outs, weight_of(outs)))
        loss.backward()
        got.update({f"grad {n}": p.grad for n, p in model.named_parameters() if p.grad is not None})
        got.update({f"grad {k}": v.grad for k, v in inputs.items() if v.is_floating_point()})
    return got


def _check(model, inputs: dict, out_of, grads: bool = True, expect_counts: dict | None = None):
    """Ours (fp32) vs sdpa (fp32) vs sdpa (fp64 truth) on one model and input."""
    g = torch.Generator().manual_seed(7)
    cache = {}

    def weight_of(outs):                   # the same random output weights for all three runs
        if "w" not in cache:
            cache["w"] = [torch.randn(o.shape, generator=g).to(o.device) for o in outs]
        return [w.to(o.dtype) for w, o in zip(cache["w"], outs)]

    ref = _run(model, "sdpa", inputs, out_of, weight_of, grads)
    model64 = copy.deepcopy(model).double()
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    truth = _run(model64, "sdpa", inputs64, out_of, weight_of, grads)
    aimv2.hf.reset_counts()
    got = _run(model, NAME, inputs, out_of, weight_of, grads)
    if expect_counts is not None:
        assert aimv2.hf.counts() == expect_counts
    assert got.keys() == ref.keys() == truth.keys()
    if grads:                              # every projection into the attention has its gradient checked
        assert any("q_proj" in k for k in got) and any("v_proj" in k for k in got), list(got)
    for k in got:
        assert truth[k].abs().max() > 0, f"{k}: all zero, the comparison would prove nothing"
        assert_close_to_truth(k, got[k], ref[k], truth[k])
    return got


def _aimv2_vision_cfg(**kw):
    return Aimv2VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                             image_size=28, patch_size=14, rms_norm_eps=1e-5, **kw)


def test_aimv2_vision_model_outputs_and_gradients():
    torch.manual_seed(0)
    m = Aimv2VisionModel(_aimv2_vision_cfg()).to(DEVICE)
    _nontrivial_norms(m)
    x = torch.randn(2, 3, 28, 28, device=DEVICE)
    _check(m, {"pixel_values": x}, lambda o: [o.last_hidden_state], expect_counts={"kernel": 1})


def test_aimv2_model_image_and_padded_causal_text():
    """The text tower builds a causal mask from the padding mask: its real rows run the varlen kernel."""
    torch.manual_seed(1)
    cfg = Aimv2Config(vision_config=_aimv2_vision_cfg(use_head=True).to_dict(),
                      text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                       eos_token_id=63),
                      projection_dim=16)
    m = Aimv2Model(cfg).to(DEVICE)
    _nontrivial_norms(m)
    ids = torch.randint(0, 63, (3, 7), device=DEVICE)
    ids[:, -1] = 63                                                         # eos last: pooled from there
    mask = torch.ones(3, 7, dtype=torch.long, device=DEVICE)
    mask[1, :3] = 0                                                         # left padding: eos real
    mask[2, 5:] = 0                                                         # right padding: eos in the padding,
    inputs = {"input_ids": ids, "attention_mask": mask,                    # a padded row the model reads
              "pixel_values": torch.randn(3, 3, 28, 28, device=DEVICE)}
    _check(m, inputs, lambda o: [o.image_embeds, o.text_embeds],
           expect_counts={"kernel": 1, "kernel_varlen": 1, "sdpa_padded_rows": 1})


def test_siglip_vision_and_padded_text():
    torch.manual_seed(2)
    v = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)).to(DEVICE)
    x = torch.randn(2, 3, 28, 28, device=DEVICE)
    _check(v, {"pixel_values": x}, lambda o: [o.last_hidden_state, o.pooler_output], expect_counts={"kernel": 1})
    # bidirectional padding: sdpa's padded rows see the real keys and SiglipText pools the last (padded) one
    t = SiglipTextModel(SiglipTextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                                         projection_size=64)).to(DEVICE)
    ids = torch.randint(0, 64, (2, 8), device=DEVICE)
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[0, 5:] = 0
    mask[1, :2] = 0
    _check(t, {"input_ids": ids, "attention_mask": mask}, lambda o: [o.last_hidden_state, o.pooler_output],
           expect_counts={"kernel_varlen": 1, "sdpa_padded_rows": 1})
    aimv2.hf.reset_counts()
    with torch.no_grad():
        t(input_ids=ids)                                                    # no padding: our kernel
    assert aimv2.hf.counts() == {"kernel": 1}


def _llama(layers=2, heads=4, kv_heads=2, hidden=64):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).to(DEVICE)
    _nontrivial_norms(m)
    return m


def test_llama_gqa_padding_on_both_sides():
    m = _llama(layers=1)
    ids = torch.randint(3, 64, (4, 9), device=DEVICE)
    mask = torch.ones(4, 9, dtype=torch.long, device=DEVICE)
    mask[1, :4] = 0                                                         # left: those rows see no key (0)
    mask[2, 6:] = 0                                                         # right: those rows see every real key
    mask[3, :1] = 0                                                         # both sides
    mask[3, 7:] = 0
    _check(m, {"input_ids": ids, "attention_mask": mask}, lambda o: [o.logits],
           expect_counts={"kernel_varlen": 1, "sdpa_padded_rows": 1})
    _check(m, {"input_ids": ids[:2], "attention_mask": mask[:2]}, lambda o: [o.logits], grads=False,
           expect_counts={"kernel_varlen": 1})                              # left only: no padded row sees a key
    holes = mask.clone()
    holes[0, 4] = 0                                                         # not one run: transformers' path
    _check(m, {"input_ids": ids, "attention_mask": holes}, lambda o: [o.logits], grads=False,
           expect_counts={"fallback:a padding mask whose real tokens are not one run per sample": 1})
    # no mask: causal from module.is_causal. B = 1: K/V heads as zero-stride views (no gqa_copy); B = 2:
    # RoPE leaves q as (B, N, H, D) in memory, whose B and H do not merge: one copy of q, k, v
    _check(m, {"input_ids": ids[:1]}, lambda o: [o.logits], expect_counts={"kernel": 1})
    _check(m, {"input_ids": ids[:2]}, lambda o: [o.logits], grads=False, expect_counts={"kernel": 1, "gqa_copy": 1})


def test_llama_greedy_generation_is_identical():
    m = _llama(layers=1).eval()
    ids = torch.randint(3, 64, (2, 6), device=DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0                                                         # left padding, as generate wants
    ids[0, :2] = 0
    out = {}
    for attn in ("sdpa", NAME):
        m.set_attn_implementation(attn)
        aimv2.hf.reset_counts()
        with torch.no_grad():
            out[attn] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out["sdpa"], out[NAME]), (out["sdpa"], out[NAME])
    # prefill on the varlen kernel; 3 decoding steps (1 query, a longer KV cache) on transformers' path
    assert aimv2.hf.counts() == {"kernel_varlen": 1, "fallback:query and key lengths differ (a KV cache)": 3}


def test_fallbacks_weights_dropout_and_head_dim():
    torch.manual_seed(4)
    m = Aimv2VisionModel(_aimv2_vision_cfg(attention_dropout=0.5)).to(DEVICE)
    x = torch.randn(1, 3, 28, 28, device=DEVICE)
    m.set_attn_implementation("eager")
    with torch.no_grad():
        ref = m.eval()(x, output_attentions=True)
    m.set_attn_implementation(NAME)
    aimv2.hf.reset_counts()
    with torch.no_grad():
        out = m(x, output_attentions=True)                                  # weights: the eager path
    assert out.attentions[0].shape == (1, 2, 4, 4)
    torch.testing.assert_close(out.attentions[0], ref.attentions[0], rtol=0, atol=0)
    assert aimv2.hf.counts() == {"fallback:attention weights are requested (the model's eager attention)": 1}
    aimv2.hf.reset_counts()
    m.train()(x)                                                            # dropout 0.5 while training: sdpa
    assert aimv2.hf.counts() == {"fallback:attention dropout > 0": 1}
    # head dim 8 is not one the kernel has: sdpa, same result
    h8 = Aimv2VisionModel(Aimv2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=28, patch_size=14)).to(DEVICE)
    reason = "fallback:head dim 8 is not one of " + str(aimv2.kernels.ATTENTION_HEAD_DIMS)
    _check(h8, {"pixel_values": x}, lambda o: [o.last_hidden_state], grads=False, expect_counts={reason: 1})


def test_register_is_idempotent_and_checks_its_name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert aimv2.hf.register() == NAME == "aimv2"
    assert AttentionInterface._global_mapping[NAME] is aimv2.hf.attention_forward
    assert AttentionMaskInterface._global_mapping[NAME] is aimv2.hf.mask_function
    assert aimv2.hf.register("aimv2_other") == "aimv2_other"
    for bad in ("sdpa", "", 3):
        with pytest.raises(ValueError, match="name: expected a new attention implementation name"):
            aimv2.hf.register(bad)


def test_kernelize_training_then_inference():
    """RMSNorms of any class that computes x * rsqrt(mean(x^2) + eps) * w (a class that does not is left
    alone), and for Aimv2 the fused MLP and residual + norm; outputs and gradients unchanged."""
    from kernels import use_kernel_forward_from_hub

    @use_kernel_forward_from_hub("RMSNorm")
    class OnePlusRMSNorm(torch.nn.Module):                                  # Gemma-style (1 + w): not ours
        def __init__(self, d):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.zeros(d)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    m = Aimv2VisionModel(_aimv2_vision_cfg()).to(DEVICE)
    _nontrivial_norms(m)
    m.extra_norm = OnePlusRMSNorm(64).to(DEVICE)                            # not called; only kernelized or not
    x = torch.randn(2, 3, 28, 28, device=DEVICE)
    ref = _run(m, NAME, {"pixel_values": x}, lambda o: [o.last_hidden_state],
               _fixed_weights)
    assert aimv2.hf.kernelize(m.train(), "training") is m
    _kernelized_as_expected(m)
    got = _run(m, NAME, {"pixel_values": x}, lambda o: [o.last_hidden_state],
               _fixed_weights)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=2e-5, atol=2e-5 * ref[k].abs().max().item())
    aimv2.hf.kernelize(m.eval(), "inference")                               # again: idempotent
    _kernelized_as_expected(m)
    got = _run(m, NAME, {"pixel_values": x}, lambda o: [o.last_hidden_state], grads=False)
    torch.testing.assert_close(got["out0"], ref["out0"], rtol=2e-5, atol=2e-5 * ref["out0"].abs().max().item())
    with pytest.raises(ValueError, match="mode: expected 'training' or 'inference'"):
        aimv2.hf.kernelize(m, "train")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        aimv2.hf.kernelize("model", "training")


def test_kernelize_refuses_where_the_kernels_cannot_run(monkeypatch):
    import aimv2.kernels as K
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None, dtype=None: "no usable GPU (test)")
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"the Triton kernels cannot run on cpu: no usable GPU \(test\)"):
        aimv2.hf.kernelize(m, "inference")


def _fixed_weights(outs):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(o.shape, generator=g).to(o.device) for o in outs]


def _kernelized_as_expected(m):
    from aimv2.hf.layers import rms_norm_compatible
    assert aimv2.hf.kernelized(m) == {
        "embeddings.rms_norm": "RMSNorm", "encoder.layers.0": "Aimv2EncoderLayer",
        "encoder.layers.0.ffn": "Aimv2MLP", "encoder.layers.0.rms_norm1": "RMSNorm",
        "encoder.layers.0.rms_norm2": "RMSNorm", "rms_norm": "RMSNorm"}
    assert "forward" not in vars(m.extra_norm)
    assert rms_norm_compatible(m.extra_norm).startswith("its forward computes something else")
    from transformers.models.aimv2 import modeling_aimv2 as M
    assert not hasattr(M.Aimv2MLP, "kernel_layer_name")                     # marks restored after the call


def test_torch_compile_fullgraph():
    """Dynamo traces the "aimv2" path with no graph break: the kernels are custom ops; a padding mask goes
    to sdpa there (its packing plan would read the mask on the host), still one graph."""
    m = _llama(layers=1).eval()
    ids = torch.randint(3, 64, (2, 7), device=DEVICE)
    mask = torch.ones(2, 7, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0
    with torch.no_grad():
        m.set_attn_implementation("sdpa")
        ref = [m(input_ids=ids[:1]).logits, m(input_ids=ids, attention_mask=mask).logits]
        m.set_attn_implementation(NAME)
        compiled = torch.compile(m, backend="eager", fullgraph=True)
        aimv2.hf.reset_counts()
        got = [compiled(input_ids=ids[:1]).logits, compiled(input_ids=ids, attention_mask=mask).logits]
    torch._dynamo.reset()
    assert aimv2.hf.counts() == {
        "kernel": 1, "fallback:a padding mask under torch.compile (the packing plan would read the mask on the host)": 1}
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
