"""Rebuild the trained student of a run from its Lightning checkpoint (for `python -m qgplm.export`).

A run dir holds `.hydra/config.yaml` (the run's config: quantizer, bits, which layers), the FP
teacher (`teacher/`, or `teacher_path` for stage=quantize) and `checkpoints/student/*.ckpt`, whose
`state_dict` holds the `DistillModule`'s student under `model.` (the teacher is excluded). The
student is rebuilt as the pipeline built it: teacher architecture -> quantize_model -> the
checkpoint's weights and quantizer scales. The checkpoint is read with `weights_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qgplm.errors import QgplmError
from qgplm.safeload import load_torch_file


def _run_dir_of(path: Path) -> Path:
    for p in [path, *path.parents]:
        if (p / ".hydra" / "config.yaml").is_file():
            return p
    raise QgplmError(f"no .hydra/config.yaml in {path} or its parents: pass ckpt=<run dir of qgplm.run> "
                     f"or a checkpoint inside one")


def resolve_checkpoint(ckpt: str) -> tuple[Path, Path]:
    """(run dir, checkpoint file): a run dir picks checkpoints/student/best.ckpt, else last.ckpt."""
    p = Path(ckpt).expanduser()
    if not p.exists():
        raise QgplmError(f"ckpt={ckpt} does not exist: pass a run dir of stage=quantize/pipeline or a .ckpt file")
    if p.is_file():
        return _run_dir_of(p.parent), p
    run_dir = _run_dir_of(p)
    for name in ("best.ckpt", "last.ckpt"):
        f = run_dir / "checkpoints" / "student" / name
        if f.is_file():
            return run_dir, f
    raise QgplmError(f"{run_dir} has no checkpoints/student/best.ckpt or last.ckpt: it holds no trained student "
                     f"(stage=teacher?); run stage=quantize or pipeline first")


def load_student(ckpt: str) -> tuple[nn.Module, Any]:
    """(quantized student with the checkpoint's weights, eval mode; its tokenizer)."""
    from omegaconf import OmegaConf

    from qgplm.models import load_pretrained, load_tokenizer
    from qgplm.quant import quantize_model
    from qgplm.train.config import RunConfig
    from qgplm.train.rundir import teacher_dir

    run_dir, ckpt_file = resolve_checkpoint(ckpt)
    try:  # YAML's safe loader: a !!python tag is refused, never constructed
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except Exception as e:  # noqa: BLE001 - yaml's parser/constructor errors and OmegaConf's alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QgplmError(f"{run_dir / '.hydra' / 'config.yaml'} cannot be read ({first}; plain YAML only, no "
                         f"!!python tags): pass the run dir of a qgplm run") from None
    OmegaConf.update(cfg, "output_dir", str(run_dir), force_add=True)  # was ${hydra:runtime.output_dir}
    if "paths" in cfg:
        OmegaConf.update(cfg, "paths.output_dir", str(run_dir), force_add=True)
    run = RunConfig.from_hydra(cfg)
    tdir = run_dir / "teacher" if run.stage == "pipeline" else teacher_dir(run.teacher_path)
    model = load_pretrained(str(tdir), run.model.kind, key="teacher_path")
    tokenizer = load_tokenizer(str(tdir), key="teacher_path")
    student = quantize_model(model, run.quant)
    data = load_torch_file(ckpt_file, f"checkpoint {ckpt_file}", "pass the run dir of a qgplm run (stage=quantize "
                           "or pipeline) or its best.ckpt/last.ckpt")
    if not isinstance(data, dict):
        raise QgplmError(f"checkpoint {ckpt_file} is not a Lightning checkpoint: pass the run dir of a qgplm run")
    state = {k.removeprefix("model."): v for k, v in data.get("state_dict", {}).items() if k.startswith("model.")}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise QgplmError(f"checkpoint {ckpt_file} does not match the run's student "
                         f"({str(e).splitlines()[0][:200]}): pass the checkpoint of this run") from None
    return student.eval(), tokenizer
