"""Without triton (setup.py installs it on Linux only) `import aimv2` and the whole impl="torch" /
attn_backend="sdpa" path work: weights load, the encoder runs, training runs on the CPU; impl="triton"
fails with one message that names the reason. Run in a subprocess whose imports cannot find triton."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from _train_common import REPO, TINY

_HIDE_TRITON = """
import sys

class _NoTriton:                    # a machine without triton: every `import triton...` fails
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
"""


def _run_without_triton(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _HIDE_TRITON + textwrap.dedent(code)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def test_hidden_triton_is_really_missing(tmp_path):
    out = _run_without_triton("""
        try:
            import triton  # noqa: F401
        except ImportError:
            print("missing")
    """, tmp_path)
    assert out.strip() == "missing"


@pytest.mark.timeout(600)
def test_torch_path_works_and_triton_path_says_why_not(tmp_path):
    out = _run_without_triton(f"""
        import math, sys
        import torch
        import aimv2
        import aimv2.kernels as K
        from aimv2.config import ModelConfig
        from aimv2.model import AIMv2Encoder
        from aimv2.weights import save_encoder

        assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules)
        why = K.unavailable_reason()
        assert why is not None and "triton cannot be imported" in why and "No module named" in why, why
        assert K.unavailable_reason("cuda", torch.bfloat16) == why
        assert 64 in K.ATTENTION_HEAD_DIMS

        # weights: save a small encoder, load it back through the hub (auto -> torch / sdpa on a CPU)
        torch.manual_seed(0)
        cfg = ModelConfig(name="small28", img_size=28, dim=128, depth=2, num_heads=2, mlp_hidden=256)
        enc = AIMv2Encoder(cfg).eval()
        save_encoder(enc, "enc", format="hf")
        got = aimv2.from_pretrained("enc", device="cpu")
        assert (got.cfg.impl, got.cfg.attn_backend) == ("torch", "sdpa")
        x = torch.randn(2, 3, 28, 28)
        with torch.no_grad():
            y, ref = got(x), enc(x)
            y_prefix = got(x, prefix_len=torch.tensor([1, 3]))              # dense-mask SDPA path
        torch.testing.assert_close(y, ref)
        assert torch.isfinite(y_prefix).all()

        # training: two steps of the tiny preset on random data, on the CPU
        from aimv2.train import TrainConfig, train
        tcfg = TrainConfig.from_preset("aimv2-tiny", **{TINY!r}, **{{
            "run.out": "run", "run.steps": 2, "run.log_every": 1, "run.ckpt_every": 0,
            "run.progress": False, "run.plot": False, "run.device": "cpu", "data.batch_size": 2,
            "data.source": "random", "optim.warmup_steps": 1, "optim.decay_steps": 10}})
        res = train(tcfg)
        assert res.step == 2 and math.isfinite(res.loss), res

        # impl="triton": one clear error, naming the reason
        bad = AIMv2Encoder(cfg.replace(impl="triton", attn_backend="triton")).eval()
        try:
            bad(x)
        except K.TritonUnavailableError as e:
            msg = str(e)
        else:
            raise AssertionError("impl='triton' ran without triton")
        assert why in msg and "impl='torch'" in msg, msg
        try:
            aimv2.from_pretrained("enc", device="cpu", backend="triton")
        except ValueError as e:
            assert why in str(e), e
        else:
            raise AssertionError("backend='triton' loaded without triton")
        print("ok")
    """, tmp_path)
    assert out.strip().endswith("ok")
