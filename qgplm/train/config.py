"""Typed run configuration, built and validated once from the composed Hydra config.

Hydra composes `conf/` into a DictConfig; `RunConfig.from_hydra(cfg)` turns the parts qgplm
owns (model, bits, method, task, teacher/student schedules) into dataclasses (the task's is the
`Config` of the task class that `task._target_` names, qgplm.tasks), rejecting unknown
keys, wrong types and out-of-range values with one-line messages that name the key and the
allowed values. Everything downstream receives these objects, never the raw DictConfig.
The `trainer`, `logger` and `callbacks` groups stay DictConfigs: they are Lightning objects
built with `hydra.utils.instantiate`, as in lightning-hydra-template.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from qgplm.checks import at_least as _at_least
from qgplm.checks import choice as _choice
from qgplm.checks import positive as _positive
from qgplm.errors import QgplmError
from qgplm.models.spec import ModelConfig
from qgplm.quant.functional import ACTIVATION_GRANULARITIES
from qgplm.quant.recipe import QuantConfig, QuantRecipe
from qgplm.tasks.base import TaskConfig, task_class
from qgplm.tasks.saved import with_target
from qgplm.train.host_memory import CPU_ALLOCATORS

STAGES = ("teacher", "quantize", "pipeline")
NEGATIVES = ("teacher", "student", "random")
PROJECTIONS = ("none", "linear")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class BitsConfig:
    """WxEyAz: weight, embedding and activation bits; null = full precision."""

    weight: int | None = 2
    embedding: int | None = 2
    activation: int | None = 8

    def validate(self) -> None:
        for key in ("weight", "embedding", "activation"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 8):
                raise QgplmError(f"bits.{key} must be an integer in 1..8 or null (full precision), got {v!r}")

    @property
    def tag(self) -> str:
        return self.quant_config(QuantConfig()).tag

    def quant_config(self, base: QuantConfig) -> QuantConfig:
        return dataclasses.replace(base, weight_bits=self.weight, embedding_bits=self.embedding,
                                   activation_bits=self.activation)


@dataclass
class DistillConfig:
    """L = kd_weight * L_dist + contrastive_weight * L_cont + ce_weight * CE (docs/method.md)."""

    kd_weight: float = 1.0
    temperature: float = 1.0
    contrastive_weight: float = 0.1  # lambda
    tau: float = 0.1
    momentum: float = 0.5
    layer: int = -1  # which hidden layer to contrast (-1: the last)
    negatives: str = "teacher"  # ablations: student (its own detached states), random (vocab embeddings)
    ce_weight: float = 0.0
    contrast_encoder: bool = False  # seq2seq: also contrast the encoder's last layer (own memory bank)
    # the method's optional head (docs/method.md) on the contrastive representations: none (default) | linear (a
    # hidden x hidden nn.Linear on the student's side, identity init, trained with the student)
    projection: str = "none"

    def validate(self) -> None:
        _choice("method.distill.negatives", self.negatives, NEGATIVES)
        _choice("method.distill.projection", self.projection, PROJECTIONS)
        _positive("method.distill.tau", self.tau)
        _positive("method.distill.temperature", self.temperature)
        if not 0.0 <= self.momentum < 1.0:
            raise QgplmError(f"method.distill.momentum must be in [0, 1), got {self.momentum}")
        for key in ("kd_weight", "contrastive_weight", "ce_weight"):
            _at_least(f"method.distill.{key}", getattr(self, key), 0)
        if self.kd_weight == self.contrastive_weight == self.ce_weight == 0:
            raise QgplmError("method.distill.kd_weight, contrastive_weight and ce_weight are all 0, so the student "
                             "would learn nothing: set method.distill.kd_weight=1.0 (the default)")

    @property
    def uses_contrastive(self) -> bool:
        return self.contrastive_weight > 0


@dataclass
class WarmupConfig:
    """Scale warm-up: hold the quantizer scales for `hold_steps`, ramp quantization in over `ramp_steps`."""

    hold_steps: int = 0
    ramp_steps: int = 0

    def validate(self) -> None:
        _at_least("method.warmup.hold_steps", self.hold_steps, 0)
        _at_least("method.warmup.ramp_steps", self.ramp_steps, 0)


def quantizer_options(cls: type) -> list[str]:
    """The keyword options of a weight quantizer's constructor (besides bits and num_rows),
    following `**kwargs` into the parent classes' constructors."""
    out: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        out += [p.name for p in params if p.name not in ("self", "bits", "num_rows", *out)
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


@dataclass(kw_only=True)
class MethodConfig(QuantRecipe):
    """A `method=` config: the quantization recipe (its fields) plus the losses and the warm-up."""

    name: str
    distill: DistillConfig = field(default_factory=DistillConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    def validate(self) -> None:
        from qgplm.quant import quantizer_kind

        options = quantizer_options(quantizer_kind(self.quantizer).factory)
        unknown = sorted(set(self.quantizer_kwargs) - set(options))
        if unknown:
            raise QgplmError(f"method.quantizer_kwargs.{unknown[0]} is not an option of quantizer {self.quantizer}: "
                             f"choose from {', '.join(options) or '(none)'}")
        _choice("method.activation_granularity", self.activation_granularity, ACTIVATION_GRANULARITIES)
        self.distill.validate()
        self.warmup.validate()

    def quant_config(self, bits: BitsConfig) -> QuantConfig:
        return bits.quant_config(QuantConfig(**self.recipe()))


@dataclass
class OptimConfig:
    lr: float = 1e-3
    scale_lr: float | None = None  # quantizer scales; None: = lr
    weight_decay: float = 0.01
    warmup_steps: int = 0
    scheduler: str = "cosine"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])

    def validate(self, prefix: str) -> None:
        _positive(f"{prefix}.lr", self.lr)
        if self.scale_lr is not None:
            _positive(f"{prefix}.scale_lr", self.scale_lr)
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0)
        _at_least(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _choice(f"{prefix}.scheduler", self.scheduler, SCHEDULERS)
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas)
                or not all(0 <= b < 1 for b in self.betas)):
            raise QgplmError(f"{prefix}.betas must be two numbers in [0, 1) (Adam's beta1, beta2), got {self.betas}: "
                             f"e.g. {prefix}.betas=[0.9,0.999]")


@dataclass
class StageConfig:
    """A training stage's budget and optimizer (the teacher's or the student's)."""

    max_steps: int = 500
    eval_every: int = 100
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, prefix: str) -> None:
        _at_least(f"{prefix}.max_steps", self.max_steps, 0)
        _positive(f"{prefix}.eval_every", self.eval_every)
        self.optim.validate(f"{prefix}.optim")


@dataclass
class RunConfig:
    stage: str
    seed: int
    model: ModelConfig
    bits: BitsConfig
    method: MethodConfig
    task: TaskConfig
    teacher: StageConfig
    student: StageConfig
    teacher_path: str | None = None
    ckpt_path: str | None = None
    output_dir: str = "."
    generate_samples: int = 0
    cpu_allocator: str = "reuse"

    def validate(self) -> None:
        _choice("stage", self.stage, STAGES)
        _choice("cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        if self.stage == "quantize" and not self.teacher_path:
            raise QgplmError("stage=quantize needs a teacher: pass teacher_path=<run dir or saved model dir>")
        self.model.validate()
        want = task_class(self.task._target_).model_kind
        if self.model.kind != want:
            hint = "model=tiny_bart, bart or seq2seq_lm" if want == "seq2seq" else "model=tiny_gpt2, gpt2 or causal_lm"
            raise QgplmError(f"task={self.task.name} needs a {want} model but model={self.model.name} has "
                             f"model.kind={self.model.kind}: use {hint} (or model.kind={want} for a {want} checkpoint)")
        self.bits.validate()
        self.method.validate()
        self._check_bits_supported()
        self.task.validate()
        self.teacher.validate("teacher")
        self.student.validate("student")
        if not 0 <= self.seed < 2**32:
            raise QgplmError(f"seed must be an integer in 0..{2**32 - 1}, got {self.seed}: set e.g. seed=42")
        _at_least("generate_samples", self.generate_samples, 0)

    def _check_bits_supported(self) -> None:
        from qgplm.quant import quantizer_kind

        kind = quantizer_kind(self.method.quantizer)
        supported = kind.supported_bits
        for key in ("weight", "embedding"):
            b = getattr(self.bits, key)
            if b is not None and b not in supported:
                raise QgplmError(f"method {self.method.name} (quantizer {self.method.quantizer}) cannot quantize "
                                 f"{key}s to {b} bits: use bits.{key} in {', '.join(map(str, supported))}")
        if self.method.activation_symmetric and self.bits.activation == 1:
            raise QgplmError("symmetric activation quantization needs bits.activation >= 2: raise it or set "
                             "method.activation_symmetric=false")
        bits = self.bits.weight or self.bits.embedding
        if bits is not None:  # option values (grid=..., gamma_init=...) checked now, not after the teacher trained
            try:
                kind.factory(bits, **self.method.quantizer_kwargs)
            except (ValueError, TypeError) as e:
                raise QgplmError(f"method.quantizer_kwargs of quantizer {self.method.quantizer}: {e}: "
                                 f"fix the value in conf/method/{self.method.name}.yaml or on the command line") from e

    @property
    def quant(self) -> QuantConfig:
        return self.method.quant_config(self.bits)

    @classmethod
    def from_hydra(cls, cfg: Any) -> RunConfig:
        """Build from a composed DictConfig (or a plain dict) and validate."""
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            data = OmegaConf.to_container(cfg, resolve=True)
        else:
            data = dict(cfg)
        owned = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in owned}
        if "task" in data:  # its dataclass is the one of the task class task._target_ names
            task = with_target(data["task"])
            target = task.get("_target_") if isinstance(task, dict) else None
            data["task"] = _build(task_class(target).Config, task, "task")
        run = _build(cls, data, "")
        run.validate()
        if isinstance(cfg, DictConfig) and isinstance(cfg.get("trainer"), DictConfig):
            validate_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
        return run


# Lightning Trainer arguments with a range (the trainer group stays a DictConfig for Lightning, which
# would refuse these only with a traceback when the Trainer is built, or not at all)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16", 64, 32, 16)


def validate_trainer(trainer: dict[str, Any]) -> None:
    def number(key: str) -> Any:
        v = trainer.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise QgplmError(f"trainer.{key} must be a number, got {v!r}: set trainer.{key}=<number>")
        return v

    acc = trainer.get("accumulate_grad_batches")
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, int) or acc < 1):
        raise QgplmError(f"trainer.accumulate_grad_batches must be an integer >= 1, got {acc!r}: "
                         "set trainer.accumulate_grad_batches=1 (no accumulation) or more")
    clip = number("gradient_clip_val")
    if clip is not None and not 0 <= clip < float("inf"):
        raise QgplmError(f"trainer.gradient_clip_val must be >= 0 or null (no clipping), got {clip}: "
                         "set trainer.gradient_clip_val=1.0 (the default) or null")
    if trainer.get("gradient_clip_algorithm") not in (None, "norm", "value"):
        raise QgplmError("trainer.gradient_clip_algorithm must be norm or value, "
                         f"got {trainer['gradient_clip_algorithm']!r}: set trainer.gradient_clip_algorithm=norm")
    nodes = trainer.get("num_nodes")
    if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
        raise QgplmError(f"trainer.num_nodes must be an integer >= 1, got {nodes!r}: "
                         "set trainer.num_nodes=1 or the number of machines")
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1 and devices != -1:
        raise QgplmError(f"trainer.devices must be >= 1, -1 (all), auto or a list of device ids, got {devices}: "
                         "set trainer.devices=1")
    if "precision" in trainer and trainer["precision"] not in PRECISIONS:
        raise QgplmError(f"trainer.precision={trainer['precision']!r} is not valid: choose one of "
                         f"{', '.join(str(p) for p in PRECISIONS[:8])}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        v = number(key)
        if v is not None and (v < 0 or (isinstance(v, float) and v > 1)):
            raise QgplmError(f"trainer.{key} must be a fraction in 0..1 or a number of batches >= 0, got {v}: "
                             f"set trainer.{key}=1.0 (all batches)")
    for key, low in (("log_every_n_steps", 1), ("num_sanity_val_steps", -1)):
        v = number(key)
        if v is not None and (not isinstance(v, int) or v < low):
            raise QgplmError(f"trainer.{key} must be an integer >= {low}, got {v}: "
                             f"set trainer.{key} to an integer >= {low}")


# ---------------------------------------------------------------- conversion helpers

def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise QgplmError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise QgplmError(f"unknown config key {where}{unknown[0]}: allowed keys under "
                         f"{prefix or 'the root'} are {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise QgplmError(f"missing config key {key}")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise QgplmError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise QgplmError(f"{key} must be a list, got {value!r}")
        return list(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise QgplmError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QgplmError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QgplmError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise QgplmError(f"{key} must be a string, got {value!r}")
        return value
    return value
