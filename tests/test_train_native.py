"""`aimv2 train --native` (method.md §8): the flags, the random packed source, --init from a fixed-size
run or released encoder weights, and a short native run end to end on the CPU."""
import io
from contextlib import redirect_stdout

import pytest
import torch
import yaml

from _train_common import losses, rows, tiny_cfg
from aimv2.cli import main as cli_main
from aimv2.model import AIMv2Encoder, AIMv2Pretrainer, flops_per_sample
from aimv2.train import train
from aimv2.train import checkpoint as ck
from aimv2.train.random_data import RandomPackedBatches
from aimv2.train.trainer import init_weights
from aimv2.weights import save_encoder

pytestmark = pytest.mark.usefixtures("one_thread")               # tests/conftest.py

NATIVE = {"model.native": True, "data.native": True, "data.min_patches": 4, "data.max_patches": 20,
          "data.tokens_per_batch": 50}


def test_cli_native_flags(capsys):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["train", "--preset", "aimv2-tiny", "--native", "--min-patches", "100", "--max-patches", "300",
                       "--tokens-per-batch", "4096", "--init", "runs/base", "--print-config"])
    assert rc == 0
    d = yaml.safe_load(buf.getvalue())
    assert d["model"]["native"] is True and d["data"]["native"] is True
    assert (d["data"]["min_patches"], d["data"]["max_patches"], d["data"]["tokens_per_batch"],
            d["run"]["init"]) == (100, 300, 4096, "runs/base")
    assert cli_main(["train", "--preset", "aimv2-tiny", "--set", "data.native=true", "--print-config"]) == 2
    assert "data.native (packed batches of images at their own sizes) needs model.native" in capsys.readouterr().err
    assert cli_main(["train", "--preset", "aimv2-tiny", "--native", "--max-patches", "100", "--print-config"]) == 2
    assert "max_patches" in capsys.readouterr().err                    # below the default min_patches 256


def test_random_packs_fit_and_resume(device):
    cfg = tiny_cfg("unused", **NATIVE).model
    stream = RandomPackedBatches(cfg, 50, 4, 20, seed=3, rank=1)
    packs = [next(stream) for _ in range(4)]
    for b in packs:
        lens = b.lengths
        assert b.num_tokens <= 50 and all(4 <= n <= 20 for n in lens)
        assert all(1 <= p < n for p, n in zip(b.prefix_len.tolist(), lens))
        assert b.text.shape == (b.num_images, cfg.text_len) and b.patches.shape[1] == cfg.patch_dim
    assert len({g for b in packs for g in b.grids}) > 3                   # sizes and aspect ratios vary
    pos = RandomPackedBatches(cfg, 50, 4, 20, seed=3, rank=1)
    next(pos)
    again = RandomPackedBatches(cfg, 50, 4, 20, seed=3, rank=1, start_sample=pos.state_dict()["sample"])
    for want in packs[1:]:
        got = next(again)
        assert got.grids == want.grids and torch.equal(got.patches, want.patches)
        assert torch.equal(got.prefix_len, want.prefix_len) and torch.equal(got.text, want.text)
    other_rank = next(RandomPackedBatches(cfg, 50, 4, 20, seed=3, rank=0))
    assert not torch.equal(other_rank.patches[:10], packs[0].patches[:10])


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    """A 2-step fixed-size (56 px) run: the checkpoint that --init fine-tunes from."""
    out = tmp_path_factory.mktemp("fixed") / "run"
    return train(tiny_cfg(out, **{"run.steps": 2}))


@pytest.mark.parametrize("native_pos", ["sincos", "interpolate"])
def test_init_from_a_training_run(fixed_run, native_pos):
    saved, _, _ = ck.load_checkpoint(fixed_run.checkpoint)
    cfg = tiny_cfg("unused", **NATIVE, **{"model.native_pos": native_pos}).model
    model = AIMv2Pretrainer(cfg)
    logs = []
    init_weights(model, str(fixed_run.run_dir), logs.append)                   # a run dir: its newest
    got = model.state_dict()
    assert ("encoder.preprocessor.pos_embed" in got) == (native_pos == "interpolate")
    assert set(got) == set(saved) - ({"encoder.preprocessor.pos_embed"} - set(got))
    for k, v in got.items():
        assert torch.equal(v, saved[k]), k
    assert "encoder, decoder and text head" in logs[-1]


def test_init_from_a_native_run(tmp_path):
    """Fine-tuning on from a native (sin-cos) run: its checkpoint holds no position table and loads whole."""
    run = train(tiny_cfg(tmp_path / "a", **NATIVE, **{"run.steps": 1}))
    saved, _, _ = ck.load_checkpoint(run.checkpoint)
    model = AIMv2Pretrainer(tiny_cfg("unused", **NATIVE).model)
    init_weights(model, str(run.run_dir), lambda m: None)
    got = model.state_dict()
    assert set(got) == set(saved) and "encoder.preprocessor.pos_embed" not in got
    assert all(torch.equal(v, saved[k]) for k, v in got.items())


def test_init_from_released_encoder_weights_and_a_wrong_size(tmp_path):
    cfg = tiny_cfg("unused", **NATIVE).model
    torch.manual_seed(1)
    enc = AIMv2Encoder(cfg.replace(native=False))
    save_encoder(enc, tmp_path / "hf", format="hf")
    model = AIMv2Pretrainer(cfg)
    dec_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    logs = []
    init_weights(model, str(tmp_path / "hf"), logs.append)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k]), k
    assert all(torch.equal(v, dec_before[k]) for k, v in model.decoder.state_dict().items())
    assert "decoder and text head start fresh" in logs[-1]
    save_encoder(AIMv2Encoder(cfg.replace(native=False, dim=64, num_heads=1, mlp_hidden=256)), tmp_path / "small",
                 format="hf")
    with pytest.raises(ValueError, match="does not fit"):
        init_weights(AIMv2Pretrainer(cfg), str(tmp_path / "small"), logs.append)


def test_native_run_end_to_end(fixed_run, tmp_path):
    """2 native steps from the fixed run's weights: finite losses, per-pack image counts in the
    metrics, a checkpoint; the first step's loss is the init model's packed loss on the first pack."""
    cfg = tiny_cfg(tmp_path / "native", **NATIVE, **{"run.init": str(fixed_run.checkpoint), "run.steps": 2})
    res = train(cfg)
    r = rows(res.run_dir)
    assert [x["step"] for x in r] == [1, 2] and res.checkpoint is not None
    assert all(torch.isfinite(torch.tensor([x["loss"], x["pixel_loss"], x["text_loss"]])).all() for x in r)
    model = AIMv2Pretrainer(cfg.model.replace(impl="torch", attn_backend="sdpa"))
    init_weights(model, str(fixed_run.checkpoint), lambda m: None)
    first = next(RandomPackedBatches(cfg.model, 50, 4, 20, seed=cfg.data.seed))
    with torch.no_grad():
        want = model(first)["loss"].item()
    assert r[0]["loss"] == pytest.approx(want, rel=1e-5)
    # throughput of step 1 counts that pack: its images, and each image's FLOPs at its own size
    seconds = first.num_images / r[0]["images_per_s"]
    flops = sum(flops_per_sample(cfg.model, n) for n in first.lengths)
    assert r[0]["tflops"] * 1e12 * seconds == pytest.approx(flops, rel=1e-9)
    assert r[0]["tokens_per_s"] * seconds == pytest.approx(first.num_tokens + first.num_images * cfg.model.text_len)


def test_native_run_on_the_data_loader(fixed_run, tmp_path):
    """The real native loader (aimv2.data, embedded synthetic images, packs by tokens) feeds the loop:
    step 1's loss is the --init model's packed loss on the loader's first pack."""
    from aimv2.train import distributed as D
    from aimv2.train.trainer import build_data
    cfg = tiny_cfg(tmp_path / "native", **{
        **NATIVE, "data.source": "shards", "data.synthetic_num": 16, "data.synthetic_size": 112,
        "data.num_workers": 0, "data.max_patches": 30, "data.tokens_per_batch": 90,
        "run.init": str(fixed_run.checkpoint), "run.steps": 2})
    res = train(cfg)
    r = rows(res.run_dir)
    assert [x["step"] for x in r] == [1, 2] and all(x["images_per_s"] > 0 for x in r)
    first = next(iter(build_data(cfg, cfg.model, D.DistInfo(0, 1, 0, "none", torch.device("cpu")), 4, None)))
    assert len(set(first.grids)) > 1 and first.num_tokens <= 90                   # sizes vary, packed by tokens
    model = AIMv2Pretrainer(cfg.model)
    init_weights(model, str(fixed_run.checkpoint), lambda m: None)
    with torch.no_grad():
        want = model(first)["loss"].item()
    assert r[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_native_run_resumes_exactly(tmp_path):
    """3 native steps in one go == 2 steps, then --resume for the third (the packed stream's position
    and the RNG come back from the checkpoint); --init is ignored on resume."""
    whole = train(tiny_cfg(tmp_path / "whole", **NATIVE, **{"run.steps": 3}))
    part = tmp_path / "part"
    train(tiny_cfg(part, **NATIVE, **{"run.steps": 2}))
    train(tiny_cfg(part, **NATIVE, **{"run.steps": 3, "run.resume": True, "run.init": "no/such/dir"}))
    assert losses(part) == losses(whole.run_dir)


def test_native_grad_accum_ignores_the_unused_batch_size(tmp_path):
    """Native packs are sized by tokens: grad_accum 3 with batch_size 32 (unused there; not a multiple of
    3) runs instead of failing the fixed-size batch check."""
    res = train(tiny_cfg(tmp_path / "acc", **NATIVE, **{"run.steps": 2, "optim.grad_accum": 3,
                                                         "data.batch_size": 32}))
    assert res.step == 2 and len(losses(res.run_dir)) == 2


def test_init_interpolate_from_a_sincos_native_checkpoint_is_a_clear_error(tmp_path):
    """A sin-cos `-native` checkpoint has no table for native_pos=interpolate to resize: run.init says so
    (it used to load a sin-cos table as if learned and resize it per grid); sincos loads it whole."""
    cfg = tiny_cfg("unused", **NATIVE).model                                   # native, sin-cos
    torch.manual_seed(2)
    save_encoder(AIMv2Encoder(cfg), tmp_path / "native", format="hf")
    with pytest.raises(ValueError, match="run.init: .*has none"):
        init_weights(AIMv2Pretrainer(cfg.replace(native_pos="interpolate")), str(tmp_path / "native"),
                     lambda m: None)
    model = AIMv2Pretrainer(cfg)
    init_weights(model, str(tmp_path / "native"), lambda m: None)
    assert "preprocessor.pos_embed" not in model.encoder.state_dict()
