"""TrainConfig: presets, YAML round trip, --set parsing with type checks, CLI resolution order."""
import io
from contextlib import redirect_stdout

import pytest
import yaml

from aimv2.cli import main as cli_main
from aimv2.presets import get_preset
from aimv2.train import TrainConfig
from aimv2.train.cli import build_config, register


def test_from_preset_overrides_and_sections():
    cfg = TrainConfig.from_preset("aimv2-large", **{"run.steps": 7, "optim.lr": 4e-4},
                                  data={"batch_size": 96})
    assert cfg.model == get_preset("aimv2-large")
    assert (cfg.run.steps, cfg.optim.lr, cfg.data.batch_size) == (7, 4e-4, 96)
    assert isinstance(cfg.optim.lr, float) and cfg.optim.betas == (0.9, 0.95)
    assert TrainConfig.from_preset("aimv2-tiny", **{"optim.lr": 1}).optim.lr == 1.0      # int -> float


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig.from_preset("aimv2-tiny", **{"model.depth": 3, "optim.betas": (0.8, 0.9),
                                                    "optim.warmup_steps": None, "data.shards": "/x/{0..3}.tar"})
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = TrainConfig.from_yaml(path)
    assert again == cfg
    assert again.optim.betas == (0.8, 0.9) and again.model.depth == 3
    # a partial file with a preset base
    path.write_text("preset: aimv2-huge\nrun: {steps: 11}\nmodel: {img_size: 448}\n")
    part = TrainConfig.from_yaml(path)
    assert part.model == get_preset("aimv2-huge", img_size=448) and part.run.steps == 11


@pytest.mark.parametrize("text, key, expected", [
    ("optim.lr=3e-4", ("optim", "lr"), 3e-4),
    ("optim.lr=1", ("optim", "lr"), 1.0),
    ("run.steps=12", ("run", "steps"), 12),
    ("run.compile=true", ("run", "compile"), True),
    ("run.compile=null", ("run", "compile"), None),
    ("optim.warmup_steps=none", ("optim", "warmup_steps"), None),
    ("optim.betas=[0.9, 0.99]", ("optim", "betas"), (0.9, 0.99)),
    ("data.shards=/d/{000..009}.tar", ("data", "shards"), "/d/{000..009}.tar"),
    ("data.tokenizer=123", ("data", "tokenizer"), "123"),          # str field: kept as text
    ("model.attn_backend=flex", ("model", "attn_backend"), "flex"),
])
def test_set_parses_by_field_type(text, key, expected):
    cfg = TrainConfig.from_preset("aimv2-tiny").set([text])
    got = getattr(getattr(cfg, key[0]), key[1])
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text, match", [
    ("optim.lrr=1e-3", r"unknown config key optim\.lrr; known optim keys: lr, "),
    ("trainer.steps=3", r"unknown config section 'trainer'"),
    ("steps=3", r"section\.key"),
    ("run.steps", r"section\.key=value"),
    ("run.steps=abc", r"run\.steps: expected int, got 'abc'"),
    ("run.steps=1.5", r"run\.steps: expected int"),
    ("run.steps=true", r"run\.steps: expected int"),
    ("run.compile=3", r"run\.compile: expected"),
    ("optim.betas=[0.9]", r"optim\.betas: expected a list of 2"),
    ("run.steps=0", r"run\.steps must be > 0"),
    ("run.precision=fp8", r"run\.precision must be one of"),
    ("model.attn_backend=xformers", r"attn_backend must be one of"),
    ("model.dim=101", r"dim 101 not divisible by num_heads"),
])
def test_set_errors_name_the_key(text, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_preset("aimv2-tiny").set([text])


def test_yaml_unknown_keys_and_types(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("run: {stepz: 3}\n")
    with pytest.raises(ValueError, match=r"run\.stepz"):
        TrainConfig.from_yaml(p)
    p.write_text("optim: {lr: fast}\n")
    with pytest.raises(ValueError, match=r"optim\.lr: expected float, got 'fast'"):
        TrainConfig.from_yaml(p)
    p.write_text("run: 3\n")
    with pytest.raises(ValueError, match=r"section 'run': expected a mapping"):
        TrainConfig.from_yaml(p)
    with pytest.raises(ValueError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def _parse(argv):
    import argparse
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    return ap.parse_args(argv)


def test_cli_resolution_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: aimv2-huge\nrun: {steps: 5, log_every: 2}\noptim: {lr: 2.0e-4}\n")
    args = _parse(["train", "--config", str(y), "--steps", "9", "--lr", "5e-4", "--batch-size", "48",
                   "--data", "/s/{0..1}.tar", "--out", str(tmp_path / "r"), "--set", "optim.lr=6e-4",
                   "--no-compile"])
    cfg = build_config(args)
    assert cfg.model.name == "aimv2-huge"
    assert cfg.run.steps == 9 and cfg.run.log_every == 2           # flag over file, file over default
    assert cfg.optim.lr == 6e-4                                      # --set over flag
    assert cfg.data.batch_size == 48 and cfg.data.shards == "/s/{0..1}.tar" and cfg.run.compile is False
    # --preset beats the file's preset
    assert build_config(_parse(["train", "--preset", "aimv2-tiny", "--config", str(y)])).model.name == "aimv2-tiny"
    # --resume with only --out reads the run's config.yaml
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig.from_preset("aimv2-1b", **{"run.steps": 77}).to_yaml(run / "config.yaml")
    cfg = build_config(_parse(["train", "--resume", "--out", str(run), "--steps", "99"]))
    assert cfg.model.name == "aimv2-1b" and cfg.run.steps == 99 and cfg.run.resume
    with pytest.raises(ValueError, match="--preset NAME or --config"):
        build_config(_parse(["train", "--out", str(tmp_path / "nothing")]))


def test_cli_print_config_and_errors(capsys):
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["train", "--preset", "aimv2-tiny", "--steps", "3", "--set", "model.depth=2",
                       "--print-config"])
    assert rc == 0
    d = yaml.safe_load(buf.getvalue())
    assert d["run"]["steps"] == 3 and d["model"]["depth"] == 2 and d["model"]["name"] == "aimv2-tiny"
    assert TrainConfig.from_dict(d).run.steps == 3
    assert cli_main(["train", "--preset", "aimv2-tiny", "--set", "run.bogus=1"]) == 2
    assert "unknown config key run.bogus" in capsys.readouterr().err


def test_data_section_is_a_dataconfig(tmp_path):
    """TrainConfig.data is a DataConfig: its user settings are keys (type-checked, in config.yaml),
    the fields the trainer fills from context are not, and errors name the data.<key>."""
    from aimv2.data import DataConfig
    from aimv2.data.config import context_fields

    cfg = TrainConfig.from_preset("aimv2-tiny").set(["data.crop_scale=[0.5, 1]", "data.crop_ratio=[1, 2]",
                                                     "data.prefix=5", "data.shuffle_buffer=7"])
    assert isinstance(cfg.data, DataConfig)
    assert cfg.data.crop_scale == (0.5, 1.0) and type(cfg.data.crop_scale[1]) is float
    assert cfg.data.crop_ratio == (1.0, 2.0) and cfg.data.prefix == 5 and cfg.data.shuffle_buffer == 7
    d = cfg.to_dict()["data"]
    assert d["crop_scale"] == [0.5, 1.0] and not (set(d) & context_fields())
    assert {"image_size", "rank", "device", "start_sample", "train"} <= context_fields()
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    # a config.yaml written before the data section was a DataConfig still loads
    (tmp_path / "old.yaml").write_text(
        "data: {shards: null, source: shards, batch_size: 32, backend: auto, num_workers: 2, shuffle_buffer: 1000,"
        " tokenizer: null, synthetic_num: 2048, synthetic_size: null, seed: 0}\n")
    assert TrainConfig.from_yaml(tmp_path / "old.yaml").data == TrainConfig().data
    for text, match in [("data.rank=1", r"unknown config key data\.rank; known data keys: shards, batch_size"),
                        ("data.image_size=64", r"unknown config key data\.image_size"),
                        ("data.crop_scale=[0.9, 0.1]", r"data\.crop_scale: expected \(lo, hi\)"),
                        ("data.crop_scale=0.5", r"data\.crop_scale: expected a list of 2"),
                        ("data.backend=fast", r"data\.backend: expected"),
                        ("data.source=disk", r"data\.source: expected one of"),
                        ("data.batch_size=0", r"data\.batch_size must be > 0")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_preset("aimv2-tiny").set([text])


def test_build_data_fills_context_and_keeps_settings(tmp_path):
    import torch

    from aimv2.data.synth import write_synthetic_dataset
    from aimv2.train.distributed import DistInfo
    from aimv2.train.trainer import build_data

    write_synthetic_dataset(str(tmp_path), num=8, size=64, seed=0, shard_size=8, progress=False, workers=1)
    cfg = TrainConfig.from_preset("aimv2-tiny", **{"model.img_size": 56, "data.shards": str(tmp_path),
                                                   "data.crop_scale": (0.6, 0.9), "data.seed": 4,
                                                   "data.backend": "torch", "data.batch_size": 16})
    info = DistInfo(rank=1, world_size=2, local_rank=1, mode="ddp", device=torch.device("cpu"))
    loader = build_data(cfg, cfg.model, info, micro_bs=4, pos={"epoch": 2, "sample": 3})
    got = loader.cfg
    assert (got.image_size, got.patch_size, got.text_len) == (56, cfg.model.patch_size, cfg.model.text_len)
    assert (got.batch_size, got.rank, got.world_size, got.device) == (4, 1, 2, "cpu")
    assert (got.start_epoch, got.start_sample, got.train, got.drop_last) == (2, 3, True, True)
    assert (got.crop_scale, got.seed, got.backend, got.shards) == ((0.6, 0.9), 4, "torch", str(tmp_path))
    assert cfg.data.batch_size == 16 and cfg.data.rank == 0            # the config itself is unchanged


@pytest.mark.parametrize("shards, hflip, expected", [
    ("given", None, True),     # real shards: the paper's flip
    (None, None, False),       # the embedded dataset: its captions name left and right
    ("given", False, False), (None, True, True)])   # a setting is kept as it is
def test_build_data_resolves_the_flip(tmp_path, monkeypatch, shards, hflip, expected):
    import torch

    import aimv2.data
    from aimv2.data.synth import write_synthetic_dataset
    from aimv2.train.distributed import DistInfo
    from aimv2.train.trainer import build_data

    write_synthetic_dataset(str(tmp_path), num=8, size=64, seed=0, shard_size=8, progress=False, workers=1)
    monkeypatch.setattr(aimv2.data, "default_dataset", lambda **kw: str(tmp_path))   # no 2k-image generation
    over = {"model.img_size": 56, "data.backend": "torch", "data.batch_size": 4,
            "data.shards": str(tmp_path) if shards else None}
    cfg = TrainConfig.from_preset("aimv2-tiny", **over)
    if hflip is not None:
        cfg = cfg.set([f"data.hflip={str(hflip).lower()}"])
    loader = build_data(cfg, cfg.model, DistInfo(0, 1, 0, "none", torch.device("cpu")), 4, None)
    assert loader.cfg.hflip is expected and cfg.data.hflip is hflip
