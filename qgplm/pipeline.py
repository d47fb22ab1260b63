"""The stages of a run: train the FP teacher, then QAT of the quantized student from it.

`run_stages` is what `qgplm.run` calls once the config is validated. Everything lands in the
run directory:
    teacher/                  the FP teacher as a HF model + tokenizer (stage teacher/pipeline)
    checkpoints/teacher/      Lightning checkpoints of the teacher stage (best.ckpt, last.ckpt)
    checkpoints/student/      ... of the QAT stage (student, quantizer scales, memory bank)
    csv/                      per-stage metric logs (logger=csv)
    metrics.json              final figures and the evaluation protocol
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from qgplm.callbacks import LAQCurvatureCallback, MemoryBankCallback, ScaleWarmupCallback
from qgplm.config import RunConfig, StageConfig
from qgplm.data.lm import LMDataModule
from qgplm.data.sources import load_texts
from qgplm.errors import QgplmError
from qgplm.io import atomic_write_json
from qgplm.models import build_model, check_compatible, load_pretrained, load_tokenizer, save_model
from qgplm.module import DistillModule, LMModule, TeacherModule
from qgplm.quant import model_size, quantize_model

log = logging.getLogger("qgplm")


def teacher_dir(path: str) -> Path:
    """A saved HF model dir, or a run dir holding one under teacher/."""
    p = Path(path).expanduser()
    if (p / "teacher" / "config.json").is_file():
        return p / "teacher"
    if not p.exists():
        raise QgplmError(f"teacher_path={path} does not exist: pass a run dir of stage=teacher or a saved model dir")
    return p


def resolve_tokenizer(cfg: RunConfig, texts: dict[str, str]) -> Any:
    """The teacher's tokenizer (stage=quantize), else one built from the task's training text
    (builtin task, or task.bpe_vocab_size), else model.tokenizer / model.name_or_path."""
    if cfg.stage == "quantize":
        return load_tokenizer(str(teacher_dir(cfg.teacher_path)), key="teacher_path")
    if cfg.task.source == "builtin":
        from qgplm.data.builtin import build_tokenizer

        return build_tokenizer(texts["train"])
    if cfg.task.bpe_vocab_size:
        from qgplm.data.bpe import train_bpe_tokenizer

        return train_bpe_tokenizer(texts["train"], cfg.task.bpe_vocab_size)
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer, key="model.tokenizer")
    if cfg.model.name_or_path is None:
        raise QgplmError("no tokenizer: set model.tokenizer=<dir or hub name>")
    return load_tokenizer(cfg.model.name_or_path, key="model.name_or_path")


def prepare_data(cfg: RunConfig) -> tuple[Any, LMDataModule]:
    texts = load_texts(cfg.task)
    tokenizer = resolve_tokenizer(cfg, texts)
    return tokenizer, LMDataModule(cfg.task, tokenizer, texts, seed=cfg.seed)


class StageRunner:
    """Builds one Lightning Trainer per stage from the Hydra trainer/logger/callbacks groups."""

    def __init__(self, cfg: RunConfig, trainer_cfg: DictConfig, logger_cfg: DictConfig | None,
                 callbacks_cfg: DictConfig | None):
        self.cfg, self.trainer_cfg = cfg, trainer_cfg
        self.logger_cfg = logger_cfg or OmegaConf.create()
        self.callbacks_cfg = callbacks_cfg or OmegaConf.create()
        self.out = Path(cfg.output_dir)

    def trainer(self, stage: str, budget: StageConfig, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
        callbacks = []
        for name, cb_cfg in self.callbacks_cfg.items():
            if name == "model_checkpoint":
                cb_cfg = OmegaConf.merge(cb_cfg, {"dirpath": str(self.out / "checkpoints" / stage)})
            callbacks.append(instantiate(cb_cfg))
        loggers = []
        for name, lg_cfg in self.logger_cfg.items():
            target = str(lg_cfg.get("_target_", ""))
            if target.endswith("CSVLogger"):
                loggers.append(instantiate(lg_cfg, version=stage))
            elif target.endswith("WandbLogger"):
                loggers.append(instantiate(lg_cfg, name=f"{Path(self.out).name}-{stage}", job_type=stage))
            else:
                loggers.append(instantiate(lg_cfg))
        if not loggers:  # nothing to log learning rates to (logger=none)
            callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
        steps = max(1, budget.max_steps)
        return instantiate(self.trainer_cfg, max_steps=steps, val_check_interval=min(budget.eval_every, steps),
                           check_val_every_n_epoch=None, callbacks=callbacks + extra_callbacks,
                           logger=loggers or False, _convert_="partial")

    @staticmethod
    def finish_loggers(trainer: pl.Trainer) -> None:
        for lg in trainer.loggers:
            if hasattr(lg, "experiment") and type(lg).__name__ == "WandbLogger":
                lg.experiment.finish()

    @staticmethod
    def test(trainer: pl.Trainer, module: LMModule, dm: LMDataModule, fitted: bool) -> float:
        """Test PPL; after a fit, of the best checkpoint (its weights are loaded into `module`)."""
        best = fitted and not trainer.fast_dev_run and trainer.checkpoint_callback is not None \
            and trainer.checkpoint_callback.best_model_path
        res = trainer.test(module, datamodule=dm, ckpt_path="best" if best else None, verbose=False)
        return float(res[0]["test/ppl"])


def train_teacher(runner: StageRunner, model: torch.nn.Module, dm: LMDataModule) -> tuple[float, float | None]:
    cfg = runner.cfg
    module = TeacherModule(model, cfg.teacher.optim, cfg.teacher.max_steps)
    trainer = runner.trainer("teacher", cfg.teacher, [])
    fitted = cfg.teacher.max_steps > 0
    if fitted:
        trainer.fit(module, datamodule=dm)
    ppl = runner.test(trainer, module, dm, fitted)
    best_val = _best_score(trainer)
    runner.finish_loggers(trainer)
    return ppl, best_val


def evaluate_only(runner: StageRunner, model: torch.nn.Module, dm: LMDataModule) -> float:
    trainer = runner.trainer("teacher_eval", runner.cfg.teacher, [])
    return runner.test(trainer, LMModule(model, runner.cfg.teacher.optim, 1), dm, fitted=False)


def train_student(runner: StageRunner, teacher: torch.nn.Module, dm: LMDataModule) -> tuple[DistillModule, float, float | None]:
    cfg = runner.cfg
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), cfg.quant)
    module = DistillModule(student, teacher, cfg.method.distill, cfg.student.optim, cfg.student.max_steps)
    extra: list[pl.Callback] = [ScaleWarmupCallback(cfg.method.warmup.hold_steps, cfg.method.warmup.ramp_steps)]
    if cfg.method.distill.uses_contrastive:
        extra.append(MemoryBankCallback(cfg.method.distill.momentum))
    if cfg.method.quantizer == "laq":
        extra.append(LAQCurvatureCallback())  # D = sqrt(Adam's second moment) for LAQ's alpha
    trainer = runner.trainer("student", cfg.student, extra)
    trainer.fit(module, datamodule=dm)
    ppl = runner.test(trainer, module, dm, fitted=True)
    best_val = _best_score(trainer)
    runner.finish_loggers(trainer)
    return module, ppl, best_val


def _best_score(trainer: pl.Trainer) -> float | None:
    cb = trainer.checkpoint_callback
    score = getattr(cb, "best_model_score", None) if cb is not None else None
    return None if score is None else float(score)


def sample_generations(model: torch.nn.Module, tokenizer: Any, dm: LMDataModule, n: int,
                       prompt_tokens: int = 12, new_tokens: int = 16) -> list[dict[str, str]]:
    """Greedy continuations (HF generate) of `n` prompts spread evenly over the test stream."""
    out = []
    ids = dm.ids["test"]
    model.eval()
    for i in range(n):
        start = i * max(0, ids.numel() - prompt_tokens) // n
        prompt = ids[start : start + prompt_tokens].unsqueeze(0).to(model.device)
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out.append({"prompt": tokenizer.decode(prompt[0]), "continuation": tokenizer.decode(gen[0, prompt_tokens:])})
    return out


def export_student(student: torch.nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Packed export of the trained student (qgplm.export); a failure is logged, not fatal."""
    from qgplm.export import export_model

    try:
        return export_model(student, out, tokenizer).as_dict()
    except QgplmError as e:
        log.warning("export of the student skipped: %s", e)
        return {"error": str(e)}


RESULT_ENTRIES = ("metrics.json", "checkpoints", "teacher")


def check_fresh_run_dir(out: Path) -> None:
    """Never write over an earlier run's results."""
    taken = [name for name in RESULT_ENTRIES if (out / name).exists()]
    if taken:
        raise QgplmError(f"run dir {out} already holds a run ({', '.join(taken)}): choose a new hydra.run.dir "
                         f"(or leave it unset for a fresh timestamped one)")


def run_stages(cfg: RunConfig, trainer_cfg: DictConfig, logger_cfg: DictConfig | None,
               callbacks_cfg: DictConfig | None) -> dict[str, Any]:
    t_start = time.time()
    out = Path(cfg.output_dir)
    check_fresh_run_dir(out)
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer, dm = prepare_data(cfg)
    runner = StageRunner(cfg, trainer_cfg, logger_cfg, callbacks_cfg)
    metrics: dict[str, Any] = {
        "config": {"stage": cfg.stage, "model": cfg.model.name, "task": cfg.task.name, "method": cfg.method.name,
                   "bits": cfg.quant.tag, "seed": cfg.seed, "quantizer": cfg.method.quantizer,
                   "contrastive_weight": cfg.method.distill.contrastive_weight,
                   "negatives": cfg.method.distill.negatives, "student_steps": cfg.student.max_steps},
        "protocol": dm.protocol(),
        "wall_time_s": {},
    }
    t0 = time.time()
    if cfg.stage == "quantize":
        teacher = load_pretrained(str(teacher_dir(cfg.teacher_path)), cfg.model.kind, key="teacher_path")
        check_compatible(teacher, tokenizer, cfg.task.block_size)
        teacher_ppl, teacher_val = evaluate_only(runner, teacher, dm), None
    else:
        teacher = build_model(cfg.model, tokenizer, cfg.task.block_size)
        teacher_ppl, teacher_val = train_teacher(runner, teacher, dm)
        save_model(teacher, tokenizer, out / "teacher")
    metrics["teacher"] = {"test_ppl": teacher_ppl, "best_val_ppl": teacher_val,
                          "params": sum(p.numel() for p in teacher.parameters())}
    metrics["wall_time_s"]["teacher"] = time.time() - t0

    if cfg.stage in ("quantize", "pipeline"):
        t0 = time.time()
        module, student_ppl, student_val = train_student(runner, teacher, dm)
        size = model_size(module.student)
        metrics["student"] = {"test_ppl": student_ppl, "best_val_ppl": student_val}
        metrics["ppl_ratio"] = student_ppl / teacher_ppl
        metrics["size"] = size.as_dict()
        metrics["wall_time_s"]["student"] = time.time() - t0
        metrics["export"] = export_student(module.student, tokenizer, out / "export")
        if cfg.generate_samples > 0:
            metrics["samples"] = {
                "teacher": sample_generations(teacher, tokenizer, dm, cfg.generate_samples),
                "student": sample_generations(module.student, tokenizer, dm, cfg.generate_samples),
            }
    metrics["wall_time_s"]["total"] = time.time() - t_start
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
