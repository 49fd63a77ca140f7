"""Typed training configuration: `TrainConfig` = model + data + optim + run sections.

Resolution order (later wins), the same for the CLI and the Python API:

    preset (aimv2.presets)  ->  --config FILE.yaml  ->  everyday flags (--steps ...)  ->  --set a.b=value

A YAML file (and the resolved `config.yaml` written into every run directory) looks like

    model: {name: aimv2-tiny, depth: 4, ...}      # any ModelConfig field
    data:  {shards: null, batch_size: 32, ...}
    optim: {lr: 1.0e-3, warmup_steps: null, ...}
    run:   {steps: 1000, out: runs/tiny, ...}
    preset: aimv2-tiny                            # optional: the base the model section overrides

Unknown keys and values of the wrong type raise a ValueError naming the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aimv2.config import ModelConfig
from aimv2.data.config import DataConfig
from aimv2.presets import get_preset

DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16")
FLOAT8 = ("off", "tensorwise", "rowwise")         # aimv2/train/float8.py MODES
FLOAT8_MIN_DIM = 1024                             # its threshold (float8.py docstring's NOTE)
KERNELS = ("auto", "model")
WD_MODES = ("lr_relative", "torch")
DATA_SOURCES = ("shards", "random")


@dataclass
class DataSection(DataConfig):
    """The data section: a DataConfig (aimv2/data/config.py) as training reads it, plus its source.

    Its keys are DataConfig's user settings (crop ranges, backend, workers, shuffle, seed, prefix ...);
    the fields DataConfig takes from context (sizes from the model, rank / device from the process
    group, the resume position, the mode) are no keys here: `trainer.build_data` fills them in.
    Meanings that differ from DataConfig: `batch_size` is the GLOBAL batch per optimizer step (all
    ranks x accumulation); `shards` None is the embedded synthetic dataset; `tokenizer` is a name or path;
    `hflip` None (the default) is on (the paper's recipe), except on the embedded synthetic dataset, whose
    captions name left and right (`trainer.build_data` resolves it; true / false are kept as they are).
    """
    _name = "data"                     # error messages name the YAML / --set key: data.<field>
    shards: str | None = None          # shard pattern / dir; None: the embedded synthetic dataset
    batch_size: int = 32
    tokenizer: str | None = None
    source: str = "shards"             # "shards" (aimv2.data loader) | "random" (fixed random batches)
    synthetic_num: int = 2048          # samples of the embedded synthetic dataset when shards is None
    synthetic_size: int | None = None  # its stored image size (None: the data package's default, 224)
    hflip: bool | None = None          # None: on, off for the embedded synthetic dataset (shards None)

    def resolved_hflip(self) -> bool:
        """The flip training uses: hflip when set, else on for real shards and off for the embedded data."""
        return self.hflip if self.hflip is not None else self.shards is not None

    def validate(self) -> "DataSection":
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source: expected one of {DATA_SOURCES}, got {self.source!r}")
        # checked as build_data will read it: the embedded dataset resolved, the flip decided
        DataConfig.validate(dataclasses.replace(self, shards=self.shards or "<embedded synthetic dataset>",
                                                hflip=self.resolved_hflip()))
        return self


@dataclass
class OptimConfig:
    """method.md §5 recipe. lr is the peak; warm-up is linear from `warmup_init_lr`, then cosine to `min_lr`.

    weight_decay_mode "lr_relative": p *= 1 - weight_decay * lr / lr_peak (method.md §5), i.e. torch AdamW
    with weight_decay / lr_peak; "torch": weight_decay is passed to torch AdamW as it is.
    """
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_init_lr: float = 1e-6
    warmup_steps: int | None = None    # None: min(12500, max(1, steps // 20))
    decay_steps: int | None = None     # None: run.steps (cosine ends at the last step)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    weight_decay_mode: str = "lr_relative"
    grad_clip: float = 1.0             # <= 0 disables clipping (the norm is still measured)
    grad_accum: int = 1
    fused: bool | None = None          # None: fused AdamW (it also carries the non-finite step skip)


@dataclass
class RunConfig:
    steps: int = 1000
    out: str = "runs/aimv2"
    log_every: int = 10
    ckpt_every: int = 500              # <= 0: only the final / interrupt checkpoints
    keep_ckpts: int = 3
    resume: bool | str = False         # True: continue from the newest whole checkpoint (an error when there is
                                       # none); "auto": continue if there is one, else start (elastic restarts)
    seed: int = 0
    device: str = "auto"               # "auto" | "cpu" | "cuda" | "cuda:1" ...
    precision: str = "auto"            # auto: bf16 on a GPU, fp32 on a CPU
    compile: bool | None = None        # None: on for a GPU, off for a CPU (see trainer.py NOTE)
    kernels: str = "auto"              # auto: triton on a GPU when importable, torch/sdpa on a CPU
    distributed: str = "auto"          # auto: ddp under torchrun with >1 rank, else none
    max_bad_steps: int = 20            # consecutive non-finite steps before the run stops
    max_minutes: float | None = None   # wall-clock budget: then checkpoint and stop like SIGTERM
    progress: bool = True
    tensorboard: bool | None = None    # None: when torch.utils.tensorboard is importable
    plot: bool = True
    peak_tflops: float | None = None   # override the device-peak table for MFU
    init: str | None = None            # start from these weights (fine-tuning): a training checkpoint or
                                       # run dir (whole model), or released encoder weights (encoder only)
    float8: str = "off"                # off | tensorwise | rowwise: the encoder's and decoder's linears as
                                       # torchao float8 GEMMs (aimv2/train/float8.py; CUDA sm_89+, torchao)
    float8_min_dim: int = FLOAT8_MIN_DIM   # a linear runs in float8 when both its dims are >= this
    float8_emulate: bool = False       # torchao's emulation on any device: float8 numerics, no speed (tests)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=lambda: get_preset("aimv2-tiny"))
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        """Preset `name`, then overrides as dotted keys or sections:
        `TrainConfig.from_preset("aimv2-tiny", **{"run.steps": 100}, optim={"lr": 3e-4})`."""
        cfg = cls(model=get_preset(name))
        return cfg.merge(overrides)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        preset = d.pop("preset", None)
        cfg = cls(model=get_preset(preset)) if preset else cls()
        return cfg.merge(d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict:
        """Every section's config keys (see _field_types) with YAML-safe values (tuples as lists)."""
        return {name: {k: list(v) if isinstance(v, tuple) else v
                       for k, v in dataclasses.asdict(getattr(self, name)).items() if k in _field_types(name)}
                for name in SECTIONS}

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    # ------------------------------------------------------------------ merging
    def merge(self, overrides: dict) -> "TrainConfig":
        """A new config with `overrides` applied: {"section": {...}} or {"section.key": value}."""
        d = self.to_dict()
        for key, value in overrides.items():
            if "." in key:
                sec, _, sub = key.partition(".")
                _check_section(sec)
                _check_key(sec, sub)
                d[sec][sub] = value
            else:
                _check_section(key)
                if not isinstance(value, dict):
                    raise ValueError(f"config section {key!r}: expected a mapping, got {type(value).__name__}")
                for sub, v in value.items():
                    _check_key(key, sub)
                    d[key][sub] = v
        return _build(d)

    def set(self, assignments: list[str]) -> "TrainConfig":
        """Apply `--set section.key=value` strings; the value is parsed for the field's type."""
        out = {}
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set {a!r}: expected section.key=value (e.g. optim.lr=3e-4)")
            key, _, text = a.partition("=")
            key = key.strip()
            if "." not in key:
                raise ValueError(f"--set {a!r}: key must be section.key with section one of {SECTIONS}")
            sec, _, sub = key.partition(".")
            _check_section(sec)
            _check_key(sec, sub)
            out[key] = parse_value(text.strip(), _field_types(sec)[sub], key)
        return self.merge(out)


SECTIONS = ("model", "data", "optim", "run")
_SECTION_CLS = {"model": ModelConfig, "data": DataSection, "optim": OptimConfig, "run": RunConfig}


def _field_types(section: str) -> dict:
    """The section's config keys and their types: its fields, less those set from context (DataConfig)."""
    cls = _SECTION_CLS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if "context" not in f.metadata}


def _check_section(sec: str) -> None:
    if sec not in SECTIONS:
        raise ValueError(f"unknown config section {sec!r}; sections: {', '.join(SECTIONS)}")


def _check_key(sec: str, key: str) -> None:
    known = _field_types(sec)
    if key not in known:
        raise ValueError(f"unknown config key {sec}.{key}; known {sec} keys: {', '.join(known)}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_type(value, tp, key: str):
    """Return `value` converted to `tp` (int -> float, list -> tuple) or raise a ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return check_type(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected a list of {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{key}: unsupported config field type {tp}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def parse_value(text: str, tp, key: str):
    """Parse a --set string for a field of type `tp`: YAML scalars, plus '1e-3' style floats."""
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}={text}: cannot parse value: {e}") from None
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if isinstance(value, str):                                      # YAML 1.1 reads "1e-3" as a string
        try:
            value = int(value) if value.lstrip("+-").isdigit() else float(value)
        except ValueError:
            pass
    try:
        return check_type(value, tp, key)
    except ValueError:
        if tp is str or str in typing.get_args(tp):
            return text
        raise


def _build(d: dict) -> TrainConfig:
    secs = {}
    for sec in SECTIONS:
        types_ = _field_types(sec)
        vals = d.get(sec, {}) or {}
        unknown = sorted(set(vals) - set(types_))
        if unknown:
            raise ValueError(f"unknown config key(s) {[f'{sec}.{k}' for k in unknown]}; "
                             f"known {sec} keys: {', '.join(types_)}")
        vals = {k: check_type(v, types_[k], f"{sec}.{k}") for k, v in vals.items()}
        secs[sec] = ModelConfig.from_dict(vals) if sec == "model" else _SECTION_CLS[sec](**vals)
    cfg = TrainConfig(**secs)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> TrainConfig:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"TrainConfig: {msg}")
    cfg.model.validate()
    r, o, d = cfg.run, cfg.optim, cfg.data
    need(r.resume in (False, True, "auto"), f"run.resume must be false, true or auto, got {r.resume!r}")
    need(r.steps > 0, f"run.steps must be > 0, got {r.steps}")
    need(r.log_every > 0, f"run.log_every must be > 0, got {r.log_every}")
    need(r.keep_ckpts > 0, f"run.keep_ckpts must be > 0, got {r.keep_ckpts}")
    need(r.max_bad_steps > 0, f"run.max_bad_steps must be > 0, got {r.max_bad_steps}")
    need(r.max_minutes is None or r.max_minutes > 0, f"run.max_minutes must be > 0, got {r.max_minutes}")
    need(r.precision in PRECISIONS, f"run.precision must be one of {PRECISIONS}, got {r.precision!r}")
    need(r.kernels in KERNELS, f"run.kernels must be one of {KERNELS}, got {r.kernels!r}")
    need(r.float8 in FLOAT8, f"run.float8 must be one of {FLOAT8}, got {r.float8!r}")
    need(r.float8_min_dim >= 16, f"run.float8_min_dim must be >= 16 (float8 GEMM dims are multiples of 16), "
                                 f"got {r.float8_min_dim}")
    need(r.float8 == "off" or not cfg.model.fused_fc13,
         f"run.float8={r.float8} with model.fused_fc13=true: the fused fc1/fc3 GEMM bypasses the float8 "
         f"linears; set model.fused_fc13=false")
    need(r.distributed in DISTRIBUTED, f"run.distributed must be one of {DISTRIBUTED}, got {r.distributed!r}")
    need(d.batch_size > 0, f"data.batch_size must be > 0, got {d.batch_size}")
    need(cfg.model.native or not d.native,
         "data.native (packed batches of images at their own sizes) needs model.native; --native sets both")
    d.validate()
    need(o.grad_accum > 0, f"optim.grad_accum must be > 0, got {o.grad_accum}")
    need(o.lr > 0 and o.min_lr >= 0 and o.warmup_init_lr >= 0, "optim: lr must be > 0, min_lr / warmup_init_lr >= 0")
    need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    need(o.weight_decay_mode in WD_MODES, f"optim.weight_decay_mode must be one of {WD_MODES}")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas must lie in [0, 1), got {o.betas}")
    need(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    need(o.decay_steps is None or o.decay_steps > 0, "optim.decay_steps must be > 0")
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:                   # its message spans lines: keep the position
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ValueError(f"config file {str(path)!r}:{where}: not valid YAML "
                         f"({getattr(e, 'problem', None) or type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {str(path)!r}: expected a mapping at the top level")
    return d
