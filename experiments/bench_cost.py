"""Benchmark: training cost of QuantGPT against FP fine-tuning, KD-only QAT and torchao's QAT.

Each setting runs in its own process (so its peak RSS is its own): the same model, batch and
data; `--steps` optimizer steps after `--warmup` untimed ones; prints a markdown table of the
median step time, the share of the step spent in the contrastive loss + memory bank, and the
peak memory (peak RSS of the process, on CUDA also the peak allocated GPU memory), then the
ratios the cost targets are about: QuantGPT / FP, contrastive share, qgplm / torchao.

    python experiments/bench_cost.py [--layers 4 --width 256 --vocab 8192 --block 128 --batch 16 --steps 20]
    python experiments/bench_cost.py --size gpt2-small --device cuda --precision bf16-mixed --block 512 --batch 8
    python experiments/bench_cost.py --size tiny --steps 2 --warmup 1      # seconds, on CPU (the fast test)
    python experiments/bench_cost.py --cpu-allocator system   # malloc's defaults instead of qgplm.run's

SmolLM2-135M (the pretrained GGUF teacher of model=smollm2), at experiment=smollm2_wt2's batch,
on an otherwise idle machine (timings on a busy one mean nothing):

    make bench-deps
    python experiments/bench_cost.py --size smollm2 --settings fp,quantgpt,torchao \
        --block 128 --batch 4 --steps 10 --warmup 2 --precision 32-true
    python experiments/bench_cost.py --size smollm2 --settings fp,quantgpt,torchao \
        --block 128 --batch 4 --steps 10 --warmup 2 --precision bf16-mixed

--size sets the model: tiny / small / gpt2-small are random-init GPT-2s (layers x width, vocab:
1 x 64 / 128, 4 x 256 / 8192, 12 x 768 / 50257, GPT-2 small's shape); tiny_llama a random 2-layer
Llama (64 wide, vocab 256, tied embeddings like SmolLM2's, for the tests); smollm2 the pretrained
SmolLM2-135M-Instruct from the GGUF file conf/model/smollm2.yaml names (qgplm.models.gguf).
--precision bf16-mixed runs the step under torch.autocast(<device>, bfloat16) with fp32
parameters, as trainer=gpu does; qgplm keeps its quantizer arithmetic (activation ranges, codes),
the KD soft cross-entropy and the contrastive loss in fp32 under it.

Settings (--settings, comma-separated; default all but torchao):
  fp        FP fine-tuning with cross-entropy (the teacher stage)
  kd_only   min-max 2-bit student + logits KD (frozen teacher forward included)
  quantgpt_no_contrastive   dynamic scaling + logits KD
  quantgpt  W2E2A8 dynamic scaling + logits KD + token contrastive loss + memory bank update, as
            qgplm's QAT stage computes it (DistillModule.training_step, the bank's update and the
            scale clamp after the optimizer step)
  quantgpt_token  quantgpt with per-token 8-bit activations (method.activation_granularity=token):
            the same activation granularity as the torchao setting, the like-for-like comparison
  torchao   torchao's QAT (torchao.quantization.qat, IntxFakeQuantizeConfig): int2 symmetric
            per-channel weights and int8 asymmetric per-token dynamic activations on every
            nn.Linear (LM head included), int2 per-channel token embedding: the layers qgplm's
            W2E2A8 quantizes; same teacher, same DistillModule loss (logits KD + contrastive +
            memory bank). torchao is imported from ./.bench_deps (`make bench-deps`), never
            from site-packages: transformers imports torchao whenever it finds it.

The contrastive share: the contrastive loss and the memory bank (query, loss forward, its backward
down to the student's hidden states, bank update) timed on their own on the step's tensors,
median over the same number of repetitions, divided by the setting's median step time.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qgplm.train.host_memory import CPU_ALLOCATORS

ROOT = Path(__file__).resolve().parents[1]
BENCH_DEPS = ROOT / ".bench_deps"
SETTINGS = ("fp", "kd_only", "quantgpt_no_contrastive", "quantgpt", "quantgpt_token", "torchao")
DEFAULT_SETTINGS = "fp,kd_only,quantgpt_no_contrastive,quantgpt"
SIZES = {"tiny": (1, 64, 128), "small": (4, 256, 8192), "gpt2-small": (12, 768, 50257)}  # layers, width, vocab
LLAMA_SIZES = ("tiny_llama", "smollm2")
# the bench's tiny Llama: SmolLM2's layout (GQA, SiLU MLP, RMSNorm, tied embeddings) at toy size
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def _rss_mib() -> float:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def use_bench_deps() -> None:
    """Put ./.bench_deps first on sys.path (only for the torchao setting)."""
    if str(BENCH_DEPS) not in sys.path:
        sys.path.insert(0, str(BENCH_DEPS))


def torchao_missing() -> str | None:
    """Why the torchao setting cannot run here, or None when torchao is importable from .bench_deps."""
    if not (BENCH_DEPS / "torchao" / "__init__.py").is_file():
        return f"torchao is not installed in {BENCH_DEPS}: run `make bench-deps`"
    return None


def build_teacher(a: argparse.Namespace):
    """The FP model every setting starts from (in eval mode is irrelevant: the modules set modes)."""
    import torch

    if a.size == "smollm2":
        from omegaconf import OmegaConf

        from qgplm.models.gguf import gguf_source, load_gguf_model

        cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml")
        return load_gguf_model(gguf_source(cfg.gguf_file, cfg.gguf_package), cfg.kind)
    torch.manual_seed(0)
    if a.size == "tiny_llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, max_position_embeddings=max(256, a.block)))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.width // 64, vocab_size=a.vocab,
                                      n_positions=max(256, a.block)))


def torchao_student(teacher):
    """A copy of `teacher` prepared for torchao's QAT: the layers qgplm's W2E2A8 quantizes."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    student = copy.deepcopy(teacher)
    weight = IntxFakeQuantizeConfig(torch.int2, granularity="per_channel", is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False)
    quantize_(student, QATConfig(activation_config=act, weight_config=weight, step="prepare"))  # every nn.Linear
    emb = student.get_input_embeddings()
    quantize_(student, QATConfig(weight_config=weight, step="prepare"), filter_fn=lambda m, fqn: m is emb)
    return student


def build_module(setting: str, teacher, a: argparse.Namespace):
    """(LightningModule, memory bank or None) of one setting, on the device."""
    from qgplm.distill import MemoryBank
    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model
    from qgplm.train.config import DistillConfig, OptimConfig
    from qgplm.train.module import DistillModule, TeacherModule

    optim = OptimConfig(lr=1e-4)
    if setting == "fp":
        return TeacherModule(teacher.train(), optim, a.steps).to(a.device), None
    if setting == "torchao":
        student = torchao_student(teacher)
    else:
        quantizer = "minmax" if setting == "kd_only" else "quantgpt"
        granularity = "token" if setting == "quantgpt_token" else "tensor"
        qcfg = QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8, quantizer=quantizer,
                           activation_granularity=granularity)
        student = quantize_model(copy.deepcopy(teacher), qcfg)
        initialize_quantizers(student)
    contrastive = setting in ("quantgpt", "quantgpt_token", "torchao")
    distill = DistillConfig(contrastive_weight=0.1 if contrastive else 0.0)
    module = DistillModule(student, teacher, distill, optim, a.steps).to(a.device)
    bank = None
    if distill.uses_contrastive:
        bank = MemoryBank(student.get_input_embeddings().num_embeddings, student.config.hidden_size,
                          distill.momentum).to(a.device)
        module.attach_memory_bank(bank)
    return module, bank


def time_contrastive(module, bank, batch, a: argparse.Namespace, sync, autocast) -> float:
    """Median time of the contrastive loss + memory bank on their own (see the module docstring)."""
    import torch

    from qgplm.distill import token_contrastive_loss
    from qgplm.train.module import model_forward

    d = module.distill
    with torch.no_grad(), autocast:
        t = model_forward(module.teacher, batch, d.layer)
        s = model_forward(module.student, batch, d.layer)
    h = s.hidden.detach().requires_grad_()
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        start = time.perf_counter()
        with autocast:
            q = bank.query(h, s.hidden_ids)
            loss = d.contrastive_weight * token_contrastive_loss(q, t.hidden, s.hidden_ids, s.mask, d.tau)
        loss.backward()
        bank.update(s.hidden_ids, q.detach(), s.mask)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
        h.grad = None
    return statistics.median(times)


def measure(setting: str, a: argparse.Namespace) -> dict:
    import torch

    from qgplm.train.host_memory import set_cpu_allocator

    set_cpu_allocator(a.cpu_allocator)  # first, as qgplm.run does: model loading is allocated under it too
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False "
                         "(CPU-only torch or no GPU visible)")
    if setting == "torchao":
        why = torchao_missing()
        if why:
            raise SystemExit(f"error: {why}, or leave torchao out of --settings")
        use_bench_deps()
    teacher = build_teacher(a).to(dev)
    vocab = teacher.get_input_embeddings().num_embeddings
    module, bank = build_module(setting, teacher, a)
    setup_rss = _rss_mib()
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (a.batch, a.block), device=dev)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    module.log = lambda *args, **kw: None  # no Trainer attached
    module.train()
    opt = torch.optim.AdamW(module.param_groups(), lr=1e-4)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clamp = getattr(module, "clamp_scales", None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        with autocast:
            loss = module.training_step(batch, i)
        loss.backward()
        opt.step()
        if clamp is not None:
            clamp()  # what DistillModule.optimizer_step does after every step
        opt.zero_grad(set_to_none=True)
        if bank is not None:
            bank.update(*module.pop_bank_update())
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    step = statistics.median(times)
    row = {"setting": setting, "step_s": step, "tokens_per_s": a.batch * a.block / step, "loss": float(loss),
           "peak_rss_mib": _rss_mib(), "setup_rss_mib": setup_rss, "device": str(dev), "precision": a.precision,
           "cpu_allocator": a.cpu_allocator, "contrastive_s": None, "contrastive_share": None}
    if dev.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if bank is not None:
        row["contrastive_s"] = time_contrastive(module, bank, batch, a, sync, autocast)
        row["contrastive_share"] = row["contrastive_s"] / step
    return row


def parse_settings(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SETTINGS]
    if bad or not chosen:
        raise SystemExit(f"error: --settings {text!r}: unknown setting {', '.join(bad) or '(none given)'}; "
                         f"choose from {','.join(SETTINGS)}")
    return list(dict.fromkeys(chosen))


def describe(a: argparse.Namespace) -> str:
    if a.size == "smollm2":
        model = "SmolLM2-135M-Instruct (GGUF, dequantized to fp32)"
    elif a.size == "tiny_llama":
        model = f"tiny random Llama ({TINY_LLAMA['num_hidden_layers']} x {TINY_LLAMA['hidden_size']}, " \
                f"vocab {TINY_LLAMA['vocab_size']})"
    else:
        model = f"{a.layers} x {a.width} GPT-2, vocab {a.vocab}"
    return (f"{model}, batch {a.batch} x {a.block}, {a.device}, {a.precision}, cpu_allocator={a.cpu_allocator}, "
            f"median of {a.steps} steps after {a.warmup}")


def ratio(rows: dict[str, dict], num: str, den: str) -> float | None:
    return rows[num]["step_s"] / rows[den]["step_s"] if num in rows and den in rows else None


def table(rows: list[dict], a: argparse.Namespace) -> str:
    by = {r["setting"]: r for r in rows}
    gpu = any("peak_gpu_mib" in r for r in rows)
    lines = [describe(a),
             "| setting | step time (s) | vs fp | tokens/s | contrastive + bank (s) | share of step | "
             "peak RSS (MiB) | RSS after set-up (MiB) |" + (" peak GPU allocated (MiB) |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        vs_fp = ratio(by, r["setting"], "fp")
        cells = [r["setting"], f"{r['step_s']:.3f}", f"{vs_fp:.2f}x" if vs_fp is not None else "-",
                 f"{r['tokens_per_s']:.0f}",
                 f"{r['contrastive_s']:.4f}" if r["contrastive_s"] is not None else "-",
                 f"{100 * r['contrastive_share']:.1f}%" if r["contrastive_share"] is not None else "-",
                 f"{r['peak_rss_mib']:.0f}", f"{r['setup_rss_mib']:.0f}"]
        if gpu:
            cells.append(f"{r['peak_gpu_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    q_fp, q_ao = ratio(by, "quantgpt", "fp"), ratio(by, "quantgpt", "torchao")
    if q_fp is not None:
        lines.append(f"QuantGPT / FP step time: {q_fp:.2f}x (target <= 1.4; the teacher's forward alone puts "
                     f"the floor near 1.33)")
    if "quantgpt" in by:
        lines.append(f"contrastive loss + memory bank: {100 * by['quantgpt']['contrastive_share']:.1f}% of the "
                     f"QuantGPT step (target <= 5%)")
    if q_ao is not None:
        lines.append(f"qgplm / torchao step time (same KD loss): {q_ao:.2f}x (target <= 1.0)")
    if (t_ao := ratio(by, "quantgpt_token", "torchao")) is not None:
        lines.append(f"qgplm per-token / torchao step time (both per-token 8-bit activations): {t_ao:.2f}x "
                     f"(target <= 1.0)")
    lines.append("peak RSS: each setting's own process, model loading included (RSS after set-up: the peak "
                 "before the first step)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<n>")
    ap.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    ap.add_argument("--size", choices=(*SIZES, *LLAMA_SIZES), default=None,
                    help="model preset: GPT-2 layers/width/vocab (overrides them), tiny_llama or smollm2")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma-separated, of {','.join(SETTINGS)}")
    ap.add_argument("--cpu-allocator", default="reuse", choices=CPU_ALLOCATORS,
                    help="as qgplm.run's cpu_allocator= (qgplm.train.host_memory): reuse, its default, keeps "
                         "freed memory in the process; system is malloc's defaults")
    ap.add_argument("--json", action="store_true", help="also print every row as a JSON line")
    ap.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        ap.exit(2, "error: --steps must be >= 1 and --warmup >= 0\n")
    if a.size in SIZES:
        a.layers, a.width, a.vocab = SIZES[a.size]
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    try:
        settings = parse_settings(a.settings)
    except SystemExit as e:
        ap.exit(2, f"{e}\n")
    if "torchao" in settings and (why := torchao_missing()):
        ap.exit(2, f"error: the torchao setting needs torchao: {why}, or leave torchao out of --settings\n")
    rows = []
    for s in settings:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", s], capture_output=True, text=True)
        if proc.returncode != 0:
            ap.exit(1, f"error: setting {s} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows, a))
    if a.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
