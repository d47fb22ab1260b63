"""The stages of a run: train the FP teacher, then QAT of the quantized student from it.

`run_stages` is what `qgplm.run` calls once the config is validated; it only orchestrates named
steps (open the run dir, check the model fits, prepare data, teacher step, student step, the
task's report, metrics.json). Everything task-specific comes from the run's `qgplm.tasks.Task`
(data, tokenizer, datamodule, evaluator, report); run-dir paths from `qgplm.train.rundir`.
Everything lands in the run directory:
    teacher/                  the FP teacher as a HF model + tokenizer (stage teacher/pipeline)
    checkpoints/teacher/      Lightning checkpoints of the teacher stage (best.ckpt, last.ckpt)
    checkpoints/student/      ... of the QAT stage (student, quantizer scales, memory bank)
    csv/                      per-stage metric logs (logger=csv)
    metrics.json              final figures and the evaluation protocol
    summaries_{teacher,student}.jsonl   summarization: the generated test summaries
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from qgplm.errors import QgplmError
from qgplm.io import atomic_write_json, atomic_write_text
from qgplm.models import (
    build_model,
    check_compatible,
    gguf_source,
    load_gguf_tokenizer,
    load_pretrained,
    load_tokenizer,
    save_model,
)
from qgplm.quant import initialize_quantizers, model_size, quantize_model, quantizer_kind
from qgplm.tasks import Task, build_task
from qgplm.train.callbacks import (
    KillAtStepCallback,
    MemoryBankCallback,
    QuantStatsCallback,
    RNGStateCallback,
    ScaleWarmupCallback,
    ThroughputCallback,
)
from qgplm.train.checkpoint_io import AtomicCheckpointIO
from qgplm.train.config import RunConfig, StageConfig
from qgplm.train.console import eval_mode_teacher_expected
from qgplm.train.distributed import global_rank, is_launched_rank
from qgplm.train.host_memory import set_cpu_allocator
from qgplm.train.loggers import build_loggers, finish_loggers, wandb_runs
from qgplm.train.module import DistillModule, LMModule, TeacherModule
from qgplm.train.oom import explain_out_of_memory
from qgplm.train.resume import ResumePoint, resume_point, run_identity
from qgplm.train.rundir import TEACHER_METRICS, check_fresh_run_dir, teacher_dir
from qgplm.train.targets import instantiate_checked

log = logging.getLogger("qgplm")


def _bare_bpe_class(cfg: RunConfig) -> type:
    """The class reading a bare vocab.json + merges.txt folder: BART's (<s> ... </s>) for seq2seq."""
    from transformers import BartTokenizerFast, GPT2TokenizerFast

    return BartTokenizerFast if cfg.model.kind == "seq2seq" else GPT2TokenizerFast


def resolve_tokenizer(cfg: RunConfig, task: Task, data: Any) -> Any:
    """The teacher's tokenizer (stage=quantize: the student must read ids as the teacher did), else
    the task's own (trained on its data), else model.tokenizer / the GGUF file's / model.name_or_path."""
    bare = _bare_bpe_class(cfg)
    if cfg.stage == "quantize":
        return load_tokenizer(str(teacher_dir(cfg.teacher_path)), key="teacher_path", bare_bpe_class=bare)
    own = task.own_tokenizer(data)
    if own is not None:
        return own
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer, key="model.tokenizer", bare_bpe_class=bare)
    if cfg.model.from_gguf:
        return load_gguf_tokenizer(gguf_source(cfg.model.gguf_file, cfg.model.gguf_package))
    if cfg.model.name_or_path is None:
        raise QgplmError("no tokenizer: set model.tokenizer=<dir or hub name>")
    return load_tokenizer(cfg.model.name_or_path, key="model.name_or_path", bare_bpe_class=bare)


def prepare_data(cfg: RunConfig, task: Task | None = None) -> tuple[Any, Any]:
    """(tokenizer, datamodule) of the run's task."""
    task = task or build_task(cfg.task)
    data = task.load()
    tokenizer = resolve_tokenizer(cfg, task, data)
    return tokenizer, task.datamodule(tokenizer, data, cfg.seed)


class StageRunner:
    """Builds one Lightning Trainer per stage from the Hydra trainer/logger/callbacks groups."""

    def __init__(self, cfg: RunConfig, trainer_cfg: DictConfig, logger_cfg: DictConfig | None,
                 callbacks_cfg: DictConfig | None, out: Path | None = None):
        self.cfg, self.trainer_cfg = cfg, trainer_cfg
        self.logger_cfg = logger_cfg or OmegaConf.create()
        self.callbacks_cfg = callbacks_cfg or OmegaConf.create()
        self.out = Path(out or cfg.output_dir)
        self.throughput: dict[str, ThroughputCallback] = {}  # stage -> its timer of the training steps

    def trainer(self, stage: str, budget: StageConfig, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
        callbacks = []
        for _name, cb_cfg in self.callbacks_cfg.items():
            if str(cb_cfg.get("_target_", "")).endswith("ModelCheckpoint"):
                cb_cfg = OmegaConf.merge(cb_cfg, {"dirpath": str(self.out / "checkpoints" / stage)})
            callbacks.append(instantiate_checked(cb_cfg, f"callbacks.{_name}"))
        hparams = {**dataclasses.asdict(self.cfg), "stage_run": stage,
                   "trainer": OmegaConf.to_container(self.trainer_cfg, resolve=True)}
        loggers = build_loggers(self.logger_cfg, self.out, stage, f"{self.cfg.task.name}-{self.cfg.model.name}",
                                hparams)
        if not loggers:  # nothing to log learning rates to (logger=none)
            callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
        callbacks.append(RNGStateCallback())  # exact resume: RNG states travel with every checkpoint
        callbacks.append(QuantStatsCallback())  # homogeneity, scales (and their histograms on W&B)
        kill = KillAtStepCallback.from_env(stage)
        if kill is not None:
            callbacks.append(kill)
        steps = max(1, budget.max_steps)
        plugins = [] if "plugins" in self.trainer_cfg else [AtomicCheckpointIO()]
        # last: a step's time then includes the method callbacks' on_train_batch_end (the memory bank update)
        self.throughput[stage] = timer = ThroughputCallback()
        return instantiate_checked(self.trainer_cfg, "trainer", max_steps=steps,
                                   val_check_interval=min(budget.eval_every, steps), check_val_every_n_epoch=None,
                                   callbacks=[*callbacks, *extra_callbacks, timer], logger=loggers or False,
                                   plugins=plugins, _convert_="partial")

    def train_throughput(self, stage: str) -> dict[str, Any] | None:
        """Tokens/s of `stage`'s training steps (ThroughputCallback.figures); None if it trained none."""
        cb = self.throughput.get(stage)
        return cb.figures() if cb is not None else None

    def throughput_log(self, stage: str) -> dict[str, float]:
        """{"train/tokens_per_s": ...} for the loggers' end-of-stage figures; {} if it trained no step."""
        speed = self.train_throughput(stage) or {}
        return {"train/tokens_per_s": speed["tokens_per_s"]} if speed.get("tokens_per_s") else {}

    @staticmethod
    def log_final(trainer: pl.Trainer, figures: dict[str, float], samples: list[dict[str, str]] | None = None) -> None:
        """End-of-stage figures (size, compression) to every logger, generated samples to W&B as a
        table; then close the W&B runs."""
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        runs = wandb_runs(trainer.loggers)
        if samples and runs:
            import wandb  # only with logger=wandb: wandb is not needed otherwise

            columns = list(samples[0])
            for run in runs:
                run.log({"samples": wandb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])})
        finish_loggers(trainer.loggers)

    @staticmethod
    def test(trainer: pl.Trainer, module: LMModule, dm: Any, fitted: bool) -> dict[str, float]:
        """Test metrics ({"ppl", task metrics}); after a fit, of the best checkpoint (its weights
        are loaded into `module`). The path is passed, not `ckpt_path="best"`: Lightning resolves "best"
        through the same first checkpoint callback, but warns about it when there are several (best + last)."""
        best = fitted and not trainer.fast_dev_run and trainer.checkpoint_callback is not None \
            and trainer.checkpoint_callback.best_model_path
        res = trainer.test(module, datamodule=dm, ckpt_path=best or None, verbose=False,
                           weights_only=True)  # never run code from a checkpoint (qgplm.safeload)
        return {k.removeprefix("test/"): float(v) for k, v in res[0].items()}


def train_teacher(runner: StageRunner, model: torch.nn.Module, dm: Any, evaluator: Any = None,
                  ckpt: Path | None = None) -> tuple[torch.nn.Module, dict[str, float], float | None]:
    """The trained teacher (`model` itself, or its unsharded copy after trainer=fsdp2), its test
    figures and best validation score."""
    cfg = runner.cfg
    module = TeacherModule(model, cfg.teacher.optim, cfg.teacher.max_steps, evaluator)
    module.run_identity = run_identity(cfg, "teacher")
    trainer = runner.trainer("teacher", cfg.teacher, [])
    fitted = cfg.teacher.max_steps > 0
    if fitted:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    test = runner.test(trainer, module, dm, fitted)
    model = module.gather_full_model()  # trainer=fsdp2: the trained teacher, unsharded, on every rank
    best_val = _best_score(trainer)
    runner.log_final(trainer, {**{f"test/{k}_final": v for k, v in test.items()},
                               "size/fp32_mib": model_size(model).fp32_mib, **runner.throughput_log("teacher")})
    return model, test, best_val


def evaluate_only(runner: StageRunner, model: torch.nn.Module, dm: Any, evaluator: Any = None) -> dict[str, float]:
    trainer = runner.trainer("teacher_eval", runner.cfg.teacher, [])
    test = runner.test(trainer, LMModule(model, runner.cfg.teacher.optim, 1, evaluator), dm, fitted=False)
    runner.log_final(trainer, {f"test/{k}_final": v for k, v in test.items()})
    return test


def train_student(runner: StageRunner, teacher: torch.nn.Module, dm: Any, evaluator: Any = None,
                  ckpt: Path | None = None) -> tuple[DistillModule, dict[str, float], float | None, pl.Trainer]:
    cfg = runner.cfg
    student = quantize_model(copy.deepcopy(teacher).requires_grad_(True), cfg.quant)
    module = DistillModule(student, teacher, cfg.method.distill, cfg.student.optim, cfg.student.max_steps, evaluator)
    module.run_identity = run_identity(cfg, "student")
    extra: list[pl.Callback] = [ScaleWarmupCallback(cfg.method.warmup.hold_steps, cfg.method.warmup.ramp_steps)]
    if cfg.method.distill.uses_contrastive:
        extra.append(MemoryBankCallback(cfg.method.distill.momentum, encoder=cfg.method.distill.contrast_encoder))
    extra += quantizer_kind(cfg.method.quantizer).make_callbacks()  # what the quantizer kind needs (LAQ: its curvature)
    trainer = runner.trainer("student", cfg.student, extra)
    fitted = cfg.student.max_steps > 0
    if fitted:
        with eval_mode_teacher_expected(module):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    else:  # student.max_steps=0: post-training quantization, each quantizer's initial scale, no optimizer step
        initialize_quantizers(student)
    test = runner.test(trainer, module, dm, fitted=fitted)
    module.gather_full_model()  # trainer=fsdp2: export, sizes and samples need the whole student on every rank
    best_val = _best_score(trainer)
    return module, test, best_val, trainer


def _best_score(trainer: pl.Trainer) -> float | None:
    cb = trainer.checkpoint_callback
    score = getattr(cb, "best_model_score", None) if cb is not None else None
    return None if score is None else float(score)


def save_records(evaluator: Any, path: Path) -> list[dict[str, str]]:
    """Write the evaluator's per-example outputs (generated summaries) as JSON lines."""
    records = evaluator.records() if evaluator is not None else []
    if records:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def export_student(student: torch.nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Packed export of the trained student (qgplm.export); a failure is logged, not fatal."""
    from qgplm.export import export_model

    try:
        return export_model(student, out, tokenizer).as_dict()
    except QgplmError as e:
        log.warning("export of the student skipped: %s", e)
        return {"error": str(e)}


def architecture(cfg: RunConfig, out: Path, resume: ResumePoint | None) -> Any:
    """The teacher's Hugging Face config, without loading weights or data: from the saved teacher's
    config.json (stage=quantize, a resumed student stage, a local model.name_or_path) or built from
    model.arch + model.config. None where it is only known once loaded (a hub name) or where
    loading will report the problem itself (no config.json, unknown arch)."""
    from transformers import AutoConfig

    if cfg.stage == "quantize":
        path = teacher_dir(cfg.teacher_path)
    elif resume is not None and resume.stage == "student":
        path = out / "teacher"
    elif cfg.model.name_or_path is not None:
        path = Path(cfg.model.name_or_path).expanduser()
    else:
        try:
            return AutoConfig.for_model(cfg.model.arch, **cfg.model.config)
        except Exception:  # noqa: BLE001 - build_model reports it
            return None
    if not (path / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - load_pretrained reports it
        return None


def check_model_fits(cfg: RunConfig, task: Task, hf_config: Any) -> None:
    """Every setting that indexes into the model (a hidden layer, positions) against its config:
    at start-up, so that nothing fails after a stage has trained."""
    if hf_config is None:
        return
    d = cfg.method.distill
    seq2seq = bool(getattr(hf_config, "is_encoder_decoder", False))
    if cfg.stage != "teacher" and d.uses_contrastive:
        layers = (getattr(hf_config, "decoder_layers", None) if seq2seq else None) or getattr(
            hf_config, "num_hidden_layers", None)
        if isinstance(layers, int) and not -(layers + 1) <= d.layer <= layers:
            where = "decoder layers" if seq2seq else "layers"
            raise QgplmError(f"method.distill.layer={d.layer} is beyond the model's {layers} {where} (hidden states "
                             f"0..{layers}): set method.distill.layer to an index in {-(layers + 1)}..{layers} "
                             f"(-1: the last layer, the default)")
    positions = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if isinstance(positions, int):
        task.check_positions(positions, cfg.generate_samples)


@dataclass
class Run:
    """What the steps of `run_stages` share: the validated config, the task and its data, where
    results go, and what the stages have reported so far."""

    cfg: RunConfig
    task: Task
    out: Path
    resume: ResumePoint | None
    runner: StageRunner
    tokenizer: Any
    dm: Any
    metrics: dict[str, Any] = field(default_factory=dict)
    records: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # evaluator outputs per model
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # the task's generations per model


@explain_out_of_memory
def run_stages(cfg: RunConfig, trainer_cfg: DictConfig, logger_cfg: DictConfig | None,
               callbacks_cfg: DictConfig | None) -> dict[str, Any]:
    """Teacher stage, then (stage=quantize/pipeline) the student stage; metrics.json at the end."""
    t_start = time.time()
    set_cpu_allocator(cfg.cpu_allocator)
    task = build_task(cfg.task)
    out, resume = open_run_dir(cfg)
    check_model_fits(cfg, task, architecture(cfg, out, resume))  # before any data is read or anything trains
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer, dm = prepare_data(cfg, task)
    run = Run(cfg, task, out, resume, StageRunner(cfg, trainer_cfg, logger_cfg, callbacks_cfg, out=out), tokenizer, dm)
    run.metrics = start_metrics(cfg, dm, resume)
    teacher = teacher_step(run)
    if cfg.stage in ("quantize", "pipeline"):
        student_step(run, teacher)
    run.metrics.update(task.report(run.samples, run.records, cfg.generate_samples))
    run.metrics["wall_time_s"]["total"] = time.time() - t_start
    if global_rank() == 0:
        atomic_write_json(out / "metrics.json", run.metrics)
    return run.metrics


def open_run_dir(cfg: RunConfig) -> tuple[Path, ResumePoint | None]:
    """The run dir (a resumed run's own, else output_dir, which must not hold an earlier run) and
    the resume point, if any."""
    resume = resume_point(cfg)
    out = resume.run_dir if resume else Path(cfg.output_dir)
    if resume is None:
        if not is_launched_rank():  # ranks > 0 join the run dir rank 0 has checked
            check_fresh_run_dir(out)
    else:
        log.info("resuming the %s stage of %s from %s", resume.stage, out, resume.ckpt)
    return out, resume


def start_metrics(cfg: RunConfig, dm: Any, resume: ResumePoint | None) -> dict[str, Any]:
    """The head of metrics.json: what ran (config), how it is measured (protocol)."""
    metrics: dict[str, Any] = {
        "config": {"stage": cfg.stage, "model": cfg.model.name, "task": cfg.task.name, "method": cfg.method.name,
                   "bits": cfg.quant.tag, "seed": cfg.seed, "quantizer": cfg.method.quantizer,
                   "contrastive_weight": cfg.method.distill.contrastive_weight,
                   "negatives": cfg.method.distill.negatives, "student_steps": cfg.student.max_steps},
        "protocol": dm.protocol(),
        "wall_time_s": {},
    }
    if resume is not None:
        metrics["resumed_from"] = str(resume.ckpt)
    return metrics


def teacher_step(run: Run) -> torch.nn.Module:
    """The FP teacher, trained or loaded, with its figures and evaluator records in `run`."""
    t0 = time.time()
    evaluator = run.task.evaluator(run.tokenizer, run.dm)
    teacher, run.metrics["teacher"] = _teacher_stage(run, evaluator)
    run.metrics["wall_time_s"]["teacher"] = time.time() - t0
    run.records["teacher"] = save_records(evaluator, run.out / "summaries_teacher.jsonl")
    return teacher


def student_step(run: Run, teacher: torch.nn.Module) -> None:
    """QAT of the student from `teacher`: its figures, size, export and samples into `run`."""
    cfg, m = run.cfg, run.metrics
    t0 = time.time()
    evaluator = run.task.evaluator(run.tokenizer, run.dm)
    student_ckpt = run.resume.ckpt if run.resume is not None and run.resume.stage == "student" else None
    module, test, best_val, trainer = train_student(run.runner, teacher, run.dm, evaluator, student_ckpt)
    size = model_size(module.student)
    m["student"] = {"test_ppl": test.pop("ppl"), "best_val_ppl": best_val, **test,
                    "train_throughput": run.runner.train_throughput("student")}
    m["ppl_ratio"] = m["student"]["test_ppl"] / m["teacher"]["test_ppl"]
    m["world_size"] = trainer.world_size
    checksums = bank_checksums(trainer)
    if checksums:
        m["memory_bank_checksums"] = checksums
    m["size"] = size.as_dict()
    m["wall_time_s"]["student"] = time.time() - t0
    run.records["student"] = save_records(evaluator, run.out / "summaries_student.jsonl")
    if global_rank() == 0:
        m["export"] = export_student(module.student, run.tokenizer, run.out / "export")
    run.samples = run.task.samples({"teacher": teacher, "student": module.student}, run.tokenizer, run.dm,
                                   cfg.generate_samples)
    run.runner.log_final(trainer, {"test/ppl_final": m["student"]["test_ppl"], "test/ppl_ratio": m["ppl_ratio"],
                                   **{f"test/{k}_final": v for k, v in test.items()},
                                   "size/fp32_mib": size.fp32_mib, "size/quantized_mib": size.quantized_mib,
                                   "size/compression": size.compression, **run.runner.throughput_log("student")},
                         samples_table(run.samples, run.records, cfg.generate_samples))


def bank_checksums(trainer: pl.Trainer) -> list[Any] | None:
    """The memory bank's checksum on every rank (all equal when DDP keeps the banks in step)."""
    bank = next((cb for cb in trainer.callbacks if isinstance(cb, MemoryBankCallback)), None)
    return bank.rank_checksums if bank is not None and bank.rank_checksums else None


def samples_table(samples: dict[str, list[dict[str, str]]], records: dict[str, list[dict[str, str]]],
                  n: int) -> list[dict[str, str]]:
    """Rows of the W&B samples table: the task's generations, then the first `n` evaluator records,
    each tagged with the model it came from."""
    rows = [{"model": role, **s} for role, items in samples.items() for s in items]
    return rows + [{"model": role, **r} for role, items in records.items() for r in items[:n]]


def _teacher_stage(run: Run, evaluator: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The FP teacher and its figures: loaded (stage=quantize, or a run resumed after its teacher
    stage finished) or trained (and saved, with its figures, for a later resume)."""
    cfg, task, tokenizer, out, resume = run.cfg, run.task, run.tokenizer, run.out, run.resume
    loaded = cfg.stage == "quantize" or (resume is not None and resume.stage == "student")
    if loaded:
        path = teacher_dir(cfg.teacher_path) if cfg.stage == "quantize" else out / "teacher"
        teacher = load_pretrained(str(path), cfg.model.kind, key="teacher_path")
        check_compatible(teacher, tokenizer, task.max_positions)
        check_model_fits(cfg, task, teacher.config)
        saved = out / TEACHER_METRICS
        if cfg.stage == "pipeline" and saved.is_file():
            return teacher, json.loads(saved.read_text())
        test, best_val = evaluate_only(run.runner, teacher, run.dm, evaluator), None
    else:
        teacher = build_model(cfg.model, tokenizer, task.max_positions)
        check_model_fits(cfg, task, teacher.config)  # a hub model's config is known only now, still before training
        teacher, test, best_val = train_teacher(run.runner, teacher, run.dm, evaluator,
                                                resume.ckpt if resume is not None else None)
    figures = {"test_ppl": test.pop("ppl"), "best_val_ppl": best_val,
               "params": sum(p.numel() for p in teacher.parameters()), **test,
               "train_throughput": None if loaded else run.runner.train_throughput("teacher")}
    if not loaded and global_rank() == 0:
        save_model(teacher, tokenizer, out / "teacher")
        atomic_write_json(out / TEACHER_METRICS, figures)
    return teacher, figures
