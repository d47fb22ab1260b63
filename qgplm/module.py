"""LightningModules: the full-precision teacher trainer and the QAT distillation module.

`DistillModule` holds the frozen teacher (eval mode, no grad, never in the optimizer or the
checkpoint) and the quantized student initialised from it, and computes
    L = kd_weight * L_dist + lambda * L_cont + ce_weight * CE      (PAPER.md)
The memory bank it queries is owned by `MemoryBankCallback`; quantizer scales are initialised
by `ScaleWarmupCallback`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.text import Perplexity

from qgplm.config import DistillConfig, OptimConfig
from qgplm.data.lm import IGNORE_INDEX
from qgplm.distill import MemoryBank, soft_cross_entropy, token_contrastive_loss
from qgplm.errors import QgplmError
from qgplm.quant import WeightQuantizer, scale_parameters


def lr_lambda(scheduler: str, warmup: int, total: int):
    """Linear warm-up then cosine / linear decay to 0, or constant."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0 - progress

    return f


class LMModule(pl.LightningModule):
    """Shared evaluation (perplexity) and optimizer set-up; `self.model` is what is trained."""

    def __init__(self, model: nn.Module, optim: OptimConfig, max_steps: int):
        super().__init__()
        self.model = model
        self.optim, self.max_steps = optim, max_steps
        # who wrote a checkpoint (model, task, method, bits, ...): checked on resume (qgplm.resume)
        self.run_identity: dict[str, Any] = {}
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    # ---------------------------------------------------------------- evaluation
    def _update_ppl(self, metric: Perplexity, model: nn.Module, batch: dict[str, Tensor]) -> None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        metric.update(logits[:, :-1].float(), batch["labels"][:, 1:])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update_ppl(self.val_ppl, self.model, batch)

    def on_validation_epoch_end(self) -> None:
        ppl = self.val_ppl.compute()
        self.val_ppl.reset()
        if not self.trainer.sanity_checking and not torch.isfinite(ppl):
            # Raised before ModelCheckpoint.on_validation_end: the diverged weights are never saved.
            raise QgplmError(f"validation perplexity is {ppl.item()} at step {self.global_step}: training diverged; "
                             f"{self._lower_lr_hint()}; {self._last_checkpoint_note()}")
        self.log("val/ppl", ppl, prog_bar=True, sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update_ppl(self.test_ppl, self.model, batch)

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", self.test_ppl.compute(), sync_dist=True)
        self.test_ppl.reset()

    # ---------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: matrices with weight decay; biases/LayerNorm without; quantizer scales
        with their own LR and no weight decay."""
        scales = {id(p) for p in scale_parameters(self.model)}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if not p.requires_grad or id(p) in scales:
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay, "name": "weights"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        scale_list = [p for p in scale_parameters(self.model) if p.requires_grad]
        if scale_list:
            groups.append({"params": scale_list, "weight_decay": 0.0, "name": "scales",
                           "lr": self.optim.scale_lr if self.optim.scale_lr is not None else self.optim.lr})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.AdamW(self.param_groups(), lr=self.optim.lr, betas=tuple(self.optim.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.optim.scheduler, self.optim.warmup_steps, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qgplm"] = dict(self.run_identity)

    optim_key = "teacher.optim"  # where this stage's optimizer is configured, for messages

    def _lower_lr_hint(self) -> str:
        hint = f"lower {self.optim_key}.lr (now {self.optim.lr:g})"
        if any(g.get("name") == "scales" for g in self.param_groups()):
            hint += f" or {self.optim_key}.scale_lr"
        return hint

    def _last_checkpoint_note(self) -> str:
        cb = self._trainer.checkpoint_callback if self._trainer is not None else None
        last = (getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")) if cb is not None else ""
        return f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been saved yet"

    def _check_finite(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        if not torch.isfinite(loss):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)] or list(terms)
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
            raise QgplmError(f"non-finite loss at step {self.global_step} in the {bad[0]} term ({parts}): "
                             f"{self._lower_lr_hint()}; {self._last_checkpoint_note()}")


class TeacherModule(LMModule):
    """Trains (or fine-tunes) the full-precision model with cross-entropy."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(**batch).loss
        self._check_finite(loss, {"ce": loss})
        self.log("train/loss", loss, prog_bar=True)
        return loss


def disable_dropout(model: nn.Module) -> nn.Module:
    """p = 0 in every dropout layer (also what HF's fused attention paths read as dropout_p)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


class DistillModule(LMModule):
    """QAT of the student by distillation from the frozen full-precision teacher.

    The student trains in train mode without dropout: its targets are the teacher's soft outputs
    and quantization already injects noise; dropout on top only slows convergence at QAT budgets.
    Setting it explicitly also makes the student independent of how the teacher was obtained (a
    model from `from_pretrained` is in eval mode, one just trained in train mode), which exact
    resume relies on.
    """

    optim_key = "student.optim"

    def __init__(self, student: nn.Module, teacher: nn.Module, distill: DistillConfig, optim: OptimConfig,
                 max_steps: int):
        super().__init__(disable_dropout(student.train()), optim, max_steps)
        self.teacher = teacher
        self.teacher.eval().requires_grad_(False)
        self.distill = distill
        self.memory_bank: MemoryBank | None = None
        self._bank_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._teacher_val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self._teacher_ppl_logged = False
        self._warned_clamp = False
        # The teacher is not saved in checkpoints (it is frozen and saved once as a HF model).
        self.strict_loading = False

    @property
    def student(self) -> nn.Module:
        return self.model

    def attach_memory_bank(self, bank: MemoryBank | None) -> None:
        """Called by MemoryBankCallback. Stored outside the module tree on purpose: the callback
        owns the bank's state (and checkpoints it), so it must not also land in state_dict."""
        object.__setattr__(self, "memory_bank", bank)

    def train(self, mode: bool = True) -> "DistillModule":
        super().train(mode)
        self.teacher.eval()  # dropout off in the teacher, always
        return self

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        d = self.distill
        need_hidden = d.uses_contrastive
        with torch.no_grad():
            t_out = self.teacher(input_ids=ids, attention_mask=attn, output_hidden_states=need_hidden)
        s_out = self.student(input_ids=ids, attention_mask=attn, output_hidden_states=need_hidden,
                             labels=labels if d.ce_weight > 0 else None)
        mask = attn.bool() & (labels != IGNORE_INDEX)
        terms: dict[str, Tensor] = {}
        terms["kd"] = soft_cross_entropy(s_out.logits, t_out.logits, mask, d.temperature)
        loss = d.kd_weight * terms["kd"]
        if d.uses_contrastive:
            h_s = s_out.hidden_states[d.layer]
            h_t = t_out.hidden_states[d.layer]
            q = self.memory_bank.query(h_s, ids) if self.memory_bank is not None else h_s
            negatives, negative_ids = self._negatives(h_s, ids)
            terms["contrastive"] = token_contrastive_loss(q, h_t, ids, mask, d.tau, negatives, negative_ids)
            loss = loss + d.contrastive_weight * terms["contrastive"]
            self._bank_update = (ids, q.detach(), mask)
        if d.ce_weight > 0:
            terms["ce"] = s_out.loss
            loss = loss + d.ce_weight * terms["ce"]
        self._check_finite(loss, terms)
        self.log("train/loss", loss, prog_bar=True)
        for k, v in terms.items():
            self.log(f"train/{k}", v)
        return loss

    def _negatives(self, student_hidden: Tensor, ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Negatives other than the teacher's (PAPER.md ablation): `student` uses the student's own
        representations of the sequence (detached), `random` the teacher's embeddings of uniformly
        drawn vocabulary tokens."""
        kind = self.distill.negatives
        if kind == "teacher":
            return None, None
        if kind == "student":
            return student_hidden.detach(), None
        emb = self.teacher.get_input_embeddings().weight
        if emb.shape[1] != student_hidden.shape[-1]:
            raise QgplmError("distill.negatives=random needs embedding size == hidden size: use negatives=teacher")
        rand_ids = torch.randint(0, emb.shape[0], ids.shape, device=ids.device)
        return emb[rand_ids].detach(), rand_ids

    def pop_bank_update(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(token ids, queries, mask) of the last step, for the memory-bank callback."""
        upd, self._bank_update = self._bank_update, None
        return upd

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step: keep every quantizer scale positive (warn once).

        Not in `on_before_zero_grad`: Lightning zeroes gradients between a step's forward and its
        backward, so an in-place clamp there breaks that backward."""
        super().optimizer_step(*args, **kwargs)
        self._clamp_scales()

    def _clamp_scales(self) -> None:
        clamped = False
        for m in self.student.modules():
            if isinstance(m, WeightQuantizer):
                clamped |= m.clamp_()
        if clamped and not self._warned_clamp:
            self._warned_clamp = True
            warnings.warn(f"a quantizer scale went to <= 0 at step {self.global_step} and was clamped: "
                          f"the scale LR (student.optim.scale_lr) is probably too high", stacklevel=1)

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if not self._teacher_ppl_logged:
            self._update_ppl(self._teacher_val_ppl, self.teacher, batch)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self._teacher_ppl_logged and not self.trainer.sanity_checking:
            self.log("val/teacher_ppl", self._teacher_val_ppl.compute(), sync_dist=True)
            self._teacher_ppl_logged = True
        self._teacher_val_ppl.reset()

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]
