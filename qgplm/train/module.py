"""LightningModules: the full-precision teacher trainer and the QAT distillation module.

Both work for causal LMs (GPT-2) and encoder-decoders (BART): `model_forward` is the one place
that knows how to run either on a batch (seq2seq: decoder inputs built from the labels by the
model's own `prepare_decoder_input_ids_from_labels`), and what to distil (logits at the target
positions; hidden states of the last decoder layer, or of the causal LM, for the contrastive loss;
optionally the encoder's last layer too). Task metrics beyond PPL (ROUGE, candidate ranking)
come from an evaluator (qgplm.tasks.evaluation) run in the test loop.

`DistillModule` holds the frozen teacher (eval mode, no grad, never in the optimizer or the
checkpoint) and the quantized student initialised from it, and computes
    L = kd_weight * L_dist + lambda * L_cont + ce_weight * CE      (docs/method.md, "Training objective and recipe")
The memory bank it queries is owned by `MemoryBankCallback`; quantizer scales are initialised
by `ScaleWarmupCallback`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from qgplm.data.token_stream import IGNORE_INDEX
from qgplm.distill import MemoryBank, soft_cross_entropy, token_contrastive_loss
from qgplm.errors import QgplmError
from qgplm.quant import WeightQuantizer, scale_parameters
from qgplm.quant.quantizers import clamp_scales_
from qgplm.train.config import DistillConfig, OptimConfig
from qgplm.train.metrics import Perplexity

log = logging.getLogger("qgplm")


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


@dataclass
class Forward:
    """What the losses need from one forward pass of a causal LM or an encoder-decoder."""

    logits: Tensor  # [B, T, V]
    mask: Tensor  # [B, T] positions to distil (real target tokens)
    hidden: Tensor | None  # [B, T, H] hidden states to contrast (causal LM / last decoder layer)
    hidden_ids: Tensor  # [B, T] token id at each hidden position (memory-bank rows)
    encoder_hidden: Tensor | None = None  # [B, S, H] the encoder's last layer (seq2seq only)
    loss: Tensor | None = None  # the model's own CE against the labels, when asked for


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def decoder_attention_mask(labels: Tensor) -> Tensor:
    """Real decoder inputs of right-shifted labels: the start token, then every position whose
    previous label is a token (not -100 padding). Causal attention already keeps real positions
    from seeing the padding; the mask is what tells the student's activation quantizers
    (qgplm.quant.token_mask) to leave it out of their ranges."""
    mask = torch.ones_like(labels)
    mask[:, 1:] = labels[:, :-1] != IGNORE_INDEX
    return mask


def model_forward(model: nn.Module, batch: dict[str, Tensor], layer: int | None = None, encoder: bool = False,
                  with_loss: bool = False) -> Forward:
    """Run `model` on a batch. `layer`: which hidden layer to return (None: none)."""
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    want_hidden = layer is not None or encoder
    if is_seq2seq(model):
        dec_in = model.prepare_decoder_input_ids_from_labels(labels=labels)
        out = model(input_ids=ids, attention_mask=attn, decoder_input_ids=dec_in,
                    decoder_attention_mask=decoder_attention_mask(labels), output_hidden_states=want_hidden,
                    labels=labels if with_loss else None)
        return Forward(out.logits, labels != IGNORE_INDEX,
                       out.decoder_hidden_states[layer] if layer is not None else None, dec_in,
                       out.encoder_hidden_states[-1] if encoder else None, out.loss)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=want_hidden,
                labels=labels if with_loss else None)
    return Forward(out.logits, attn.bool() & (labels != IGNORE_INDEX),
                   out.hidden_states[layer] if layer is not None else None, ids, None, out.loss)


class LMModule(pl.LightningModule):
    """Shared evaluation (perplexity, plus the task's evaluator at test time) and optimizer set-up;
    `self.model` is what is trained."""

    def __init__(self, model: nn.Module, optim: OptimConfig, max_steps: int, evaluator: Any = None):
        super().__init__()
        self.model = model
        self.optim, self.max_steps = optim, max_steps
        # who wrote a checkpoint (model, task, method, bits, ...): checked on resume (qgplm.train.resume)
        self.run_identity: dict[str, Any] = {}
        self.evaluator = evaluator
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self.test_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    # ---------------------------------------------------------------- evaluation
    def _update_ppl(self, metric: Perplexity, model: nn.Module, batch: dict[str, Tensor]) -> None:
        """PPL of the target tokens: causal LM shifted by one; seq2seq the labels themselves.
        Candidate-ranking batches (a `gold` row flag) score the gold rows only."""
        if "gold" in batch:
            batch = {k: batch[k][batch["gold"]] for k in ("input_ids", "attention_mask", "labels")}
        logits = model_forward(model, batch).logits
        if is_seq2seq(model):
            metric.update(logits.float(), batch["labels"])
        else:
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

    def on_test_epoch_start(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._update_ppl(self.test_ppl, self.model, batch)
        if self.evaluator is not None:
            self.evaluator.update(self.model, batch)

    def on_test_epoch_end(self) -> None:
        self.log("test/ppl", self.test_ppl.compute(), sync_dist=True)
        self.test_ppl.reset()
        if self.evaluator is not None:
            for k, v in self.evaluator.compute().items():
                self.log(f"test/{k}", float(v), sync_dist=True)

    # ---------------------------------------------------------------- FSDP2 (trainer=fsdp2)
    def _fsdp2(self) -> bool:
        """Whether this fit runs under Lightning's ModelParallelStrategy (trainer=fsdp2 / fsdp2_sim)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self._trainer.strategy, ModelParallelStrategy)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy only (a no-op under every other strategy): FSDP2-shard the
        trained model (`self.model`, the student of a DistillModule) per transformer block over the
        strategy's device mesh, its quantizer scales replicated (qgplm.train.fsdp). Lightning calls this
        after the callbacks' `setup`, so ScaleWarmupCallback has initialised the scales from the
        full weights, and before the strategy moves the module and restores a checkpoint (`ckpt_path=`:
        the checkpoint's scales and `initialized` flags then replace those). Only a fit shards: an
        evaluation-only run (a loaded teacher's test) keeps its model whole, and the test after a
        fit finds it sharded already (idempotent). A meta-device template of the whole model is
        kept to rebuild an unsharded copy after the stage (`gather_full_model`).

        The frozen teacher of a DistillModule stays replicated, deliberately: it has no gradients
        and no optimizer state (what FSDP saves most on: 3 of the student's 4 copies), so sharding
        it would save one copy of its weights per rank at the price of an all-gather per block
        for every training and validation forward; it also stays an ordinary module for what reads
        its weights directly (distill.negatives=random indexes its embedding table)."""
        from qgplm.train.fsdp import fully_shard_quantized, is_sharded, meta_template, shard_mesh, transformer_blocks

        if not self._fsdp2() or self.trainer.state.fn != "fit" or is_sharded(self.model):
            return
        object.__setattr__(self, "_full_template", meta_template(self.model))  # not a submodule
        blocks, mesh, name = transformer_blocks(self.model), shard_mesh(self.device_mesh), type(self.model).__name__
        fully_shard_quantized(self.model, blocks, mesh=mesh)
        log.info("FSDP2: %s sharded in %d blocks + the rest over %d ranks (mesh %s); quantizer scales replicated",
                 name, len(blocks), mesh.size(), tuple(mesh.shape))

    def gather_full_model(self) -> nn.Module:
        """After a stage under trainer=fsdp2: replace the sharded `self.model` by an ordinary copy
        with the same state, on every rank (collective), and return it; otherwise `self.model`."""
        from qgplm.train.fsdp import gather_full_model, is_sharded

        template = self.__dict__.get("_full_template")
        if template is None or not is_sharded(self.model):
            return self.model
        self.model = gather_full_model(self.model, template, self.device)
        object.__setattr__(self, "_full_template", None)
        return self.model

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Under FSDP2: average the gradients FSDP does not reduce (the replicated quantizer
        scales, a projection head), before gradient clipping and the step."""
        if self._fsdp2():
            from qgplm.train.fsdp import sync_replicated_grads

            sync_replicated_grads(p for g in optimizer.param_groups for p in g["params"])

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Under FSDP2, clip by the global norm of sharded and replicated gradients together
        (torch's clip_grad_norm_ cannot mix DTensor and plain gradients)."""
        if self._fsdp2() and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            from qgplm.train.fsdp import clip_grad_norm_

            clip_grad_norm_((p for g in optimizer.param_groups for p in g["params"]), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---------------------------------------------------------------- optimisation
    def trainable_modules(self) -> list[nn.Module]:
        """What the optimizer trains: the model (and, for distillation, an optional projection head)."""
        return [self.model]

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: matrices with weight decay; biases/LayerNorm without; quantizer scales
        with their own LR and no weight decay."""
        scales = {id(p) for p in scale_parameters(self.model)}
        decay, no_decay = [], []
        for p in (p for m in self.trainable_modules() for p in m.parameters()):
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
        """The newest checkpoint on disk: last.ckpt (its own ModelCheckpoint, see
        conf/callbacks/default.yaml), else a `save_last` path, else best.ckpt."""
        cbs = self._trainer.checkpoint_callbacks if self._trainer is not None else []
        paths = [cb.best_model_path for cb in cbs if getattr(cb, "filename", None) == "last"]
        paths += [getattr(cb, "last_model_path", "") for cb in cbs] + [getattr(cb, "best_model_path", "") for cb in cbs]
        last = next((p for p in paths if p), "")
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
        loss = model_forward(self.model, batch, with_loss=True).loss
        self._check_finite(loss, {"ce": loss})
        self.log("train/loss", loss, prog_bar=True)
        return loss


# float attributes that HF layers pass to nn.functional.dropout (BART, mBART, T5-style layers)
_FUNCTIONAL_DROPOUT = ("dropout", "activation_dropout", "attention_dropout", "layerdrop")


def disable_dropout(model: nn.Module) -> nn.Module:
    """p = 0 in every dropout layer (also what HF's fused attention paths read as dropout_p), and in
    the float rates that layers without an nn.Dropout hand to the functional dropout (BART's
    `self.dropout = config.dropout`, `activation_dropout`, `attention_dropout`, `layerdrop`)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in _FUNCTIONAL_DROPOUT:
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
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
                 max_steps: int, evaluator: Any = None):
        super().__init__(disable_dropout(student.train()), optim, max_steps, evaluator)
        self.teacher = teacher
        self.teacher.eval().requires_grad_(False)
        self.distill = distill
        if distill.contrast_encoder and not is_seq2seq(student):
            raise QgplmError("method.distill.contrast_encoder=true needs an encoder-decoder model: set it to false")
        self.memory_bank: MemoryBank | None = None
        self.encoder_memory_bank: MemoryBank | None = None
        # the optional projection head(s) of the contrastive representations (distill.projection)
        self.projection = self._projection_head(student) if distill.projection == "linear" else None
        self.encoder_projection = (self._projection_head(student)
                                   if distill.projection == "linear" and distill.contrast_encoder else None)
        self._bank_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._encoder_bank_update: tuple[Tensor, Tensor, Tensor] | None = None
        self._teacher_val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        self._teacher_ppl_logged = False
        self._warned_clamp = False
        self._quantizers: list[WeightQuantizer] | None = None  # listed at the first clamp (after any sharding)
        self._clamped: Tensor | None = None  # on the device: a scale was clamped since the last check
        # The teacher is not saved in checkpoints (it is frozen and saved once as a HF model).
        self.strict_loading = False

    @property
    def student(self) -> nn.Module:
        return self.model

    @staticmethod
    def _projection_head(student: nn.Module) -> nn.Linear:
        """`distill.projection=linear`: hidden -> hidden, initialised to the identity (so switching it
        on changes nothing at the first step), in FP32, not quantized and not part of the student
        model: a training-only head like the memory bank, saved in the checkpoint (`projection.*`)."""
        hidden = student.config.hidden_size
        head = nn.Linear(hidden, hidden)
        with torch.no_grad():
            head.weight.copy_(torch.eye(hidden))
            head.bias.zero_()
        return head

    def trainable_modules(self) -> list[nn.Module]:
        return [m for m in (self.model, self.projection, self.encoder_projection) if m is not None]

    def attach_memory_bank(self, bank: MemoryBank | None, encoder_bank: MemoryBank | None = None) -> None:
        """Called by MemoryBankCallback. Stored outside the module tree on purpose: the callback
        owns the bank's state (and checkpoints it), so it must not also land in state_dict.
        `encoder_bank`: the encoder contrast's own bank (distill.contrast_encoder)."""
        object.__setattr__(self, "memory_bank", bank)
        object.__setattr__(self, "encoder_memory_bank", encoder_bank)

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        self.teacher.eval()  # dropout off in the teacher, always
        return self

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        d = self.distill
        layer = d.layer if d.uses_contrastive else None
        encoder = d.uses_contrastive and d.contrast_encoder
        with torch.no_grad():
            t = model_forward(self.teacher, batch, layer, encoder)
        s = model_forward(self.student, batch, layer, encoder, with_loss=d.ce_weight > 0)
        terms: dict[str, Tensor] = {}
        terms["kd"] = soft_cross_entropy(s.logits, t.logits, s.mask, d.temperature)
        loss = d.kd_weight * terms["kd"]
        if d.uses_contrastive:
            ids, mask = s.hidden_ids, s.mask
            h = s.hidden if self.projection is None else self.projection(s.hidden)
            q = self.memory_bank.query(h, ids) if self.memory_bank is not None else h
            negatives, negative_ids = self._negatives(h, ids)
            terms["contrastive"] = token_contrastive_loss(q, t.hidden, ids, mask, d.tau, negatives, negative_ids)
            self._bank_update = (ids, q.detach(), mask)
            if encoder:
                e_ids, e_mask = batch["input_ids"], batch["attention_mask"].bool()
                bank = self.encoder_memory_bank
                h_enc = s.encoder_hidden
                if self.encoder_projection is not None:
                    h_enc = self.encoder_projection(h_enc)
                q_enc = bank.query(h_enc, e_ids) if bank is not None else h_enc
                neg, neg_ids = self._negatives(h_enc, e_ids)
                terms["contrastive_encoder"] = token_contrastive_loss(q_enc, t.encoder_hidden, e_ids, e_mask, d.tau,
                                                                      neg, neg_ids)
                self._encoder_bank_update = (e_ids, q_enc.detach(), e_mask)
                contrast = 0.5 * (terms["contrastive"] + terms["contrastive_encoder"])
            else:
                contrast = terms["contrastive"]
            loss = loss + d.contrastive_weight * contrast
        if d.ce_weight > 0:
            terms["ce"] = s.loss
            loss = loss + d.ce_weight * terms["ce"]
        self._check_finite(loss, terms)
        self.log("train/loss", loss, prog_bar=True)
        for k, v in terms.items():
            self.log(f"train/{k}", v)
        return loss

    def _negatives(self, student_hidden: Tensor, ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Negatives other than the teacher's (an ablation, docs/method.md): `student` uses the student's own
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

    def pop_encoder_bank_update(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The same for the encoder contrast's bank (distill.contrast_encoder)."""
        upd, self._encoder_bank_update = self._encoder_bank_update, None
        return upd

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """After each optimizer step: keep every quantizer scale positive (warn once).

        Not in `on_before_zero_grad`: Lightning zeroes gradients between a step's forward and its
        backward, so an in-place clamp there breaks that backward."""
        super().optimizer_step(*args, **kwargs)
        self.clamp_scales()

    def clamp_scales(self) -> None:
        """Clamp every quantizer scale to its bound, with no host work per step: the quantizers are
        listed once, clamped in fused ops (`clamp_scales_`), and whether any had to be is kept on
        the device, read (one sync) only before each validation and at the end of training."""
        if self._quantizers is None:
            seen: dict[int, WeightQuantizer] = {}
            for m in self.student.modules():
                if isinstance(m, WeightQuantizer):
                    seen.setdefault(id(m), m)
            self._quantizers = list(seen.values())
        flag = clamp_scales_(self._quantizers)
        if flag is not None:
            self._clamped = flag if self._clamped is None else self._clamped | flag

    def _warn_if_clamped(self) -> None:
        clamped, self._clamped = self._clamped, None
        if clamped is not None and bool(clamped) and not self._warned_clamp:
            self._warned_clamp = True
            warnings.warn(f"a quantizer scale went to <= 0 by step {self.global_step} and was clamped: "
                          f"the scale LR (student.optim.scale_lr) is probably too high", stacklevel=1)

    def on_validation_epoch_start(self) -> None:
        self._warn_if_clamped()

    def on_train_end(self) -> None:
        self._warn_if_clamped()

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
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint trained with the other `distill.projection` (strict_loading is off for
        the teacher's sake, so a missing or extra head would otherwise pass unnoticed)."""
        sd = checkpoint.get("state_dict")
        if sd is not None:
            has_head = any(k.startswith("projection.") for k in sd)
        else:  # trainer=fsdp2: ModelParallelStrategy has loaded the weights itself and passes on the rest
            was = checkpoint.get("qgplm", {}).get("projection")
            if was is None:
                return
            has_head = was == "linear"
        if has_head != (self.projection is not None):
            was = "linear" if has_head else "none"
            raise QgplmError(f"the checkpoint was trained with method.distill.projection={was}, this run has "
                             f"method.distill.projection={self.distill.projection}: resume with "
                             f"method.distill.projection={was}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["qgplm"]["projection"] = self.distill.projection  # for on_load_checkpoint under trainer=fsdp2
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("teacher.")]:
            del sd[k]
