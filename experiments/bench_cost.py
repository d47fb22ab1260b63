"""Benchmark: training cost of QuantGPT against KD-only and FP fine-tuning (issue #3).

Each setting runs in its own process (so peak memory is its own): the same model, batch and
data; `--steps` optimizer steps after `--warmup` untimed ones; prints a markdown table of the
median step time and the peak memory (CPU: peak RSS of the process; GPU: peak allocated).

    python experiments/bench_cost.py [--layers 4 --width 256 --vocab 8192 --block 128 --batch 16 --steps 20]
    python experiments/bench_cost.py --size gpt2-small --device cuda --precision bf16-mixed --block 512 --batch 8
    python experiments/bench_cost.py --size tiny --steps 2 --warmup 1      # seconds, on CPU (the fast test)

--size sets layers/width/vocab at once (tiny: 1 x 32, vocab 128; gpt2-small: 12 x 768, vocab
50257, GPT-2 small's shape, random init); --precision bf16-mixed runs the step under
torch.autocast(<device>, bfloat16) with fp32 parameters, as trainer=gpu does. Also printed:
tokens/s (batch x block / step time) and, with --json, the rows as JSON lines.

Settings:
  fp        FP fine-tuning with cross-entropy (the teacher stage)
  kd_only   min-max 2-bit student + logits KD (frozen teacher forward included)
  quantgpt_no_contrastive   dynamic scaling + logits KD
  quantgpt  dynamic scaling + logits KD + token contrastive loss + memory bank update
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

SETTINGS = ("fp", "kd_only", "quantgpt_no_contrastive", "quantgpt")
SIZES = {"tiny": (1, 64, 128), "small": (4, 256, 8192), "gpt2-small": (12, 768, 50257)}  # layers, width, vocab


def measure(setting: str, a: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qgplm.config import DistillConfig, OptimConfig
    from qgplm.distill import MemoryBank
    from qgplm.module import DistillModule, TeacherModule
    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

    torch.manual_seed(0)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False "
                         "(CPU-only torch or no GPU visible)")
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.width // 64,
                                         vocab_size=a.vocab, n_positions=max(256, a.block))).to(dev)
    x = torch.randint(0, a.vocab, (a.batch, a.block), device=dev)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    optim = OptimConfig(lr=1e-4)
    bank = None
    if setting == "fp":
        module = TeacherModule(teacher, optim, a.steps)
    else:
        quantizer = "minmax" if setting == "kd_only" else "quantgpt"
        qcfg = QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8, quantizer=quantizer)
        student = quantize_model(copy.deepcopy(teacher), qcfg)
        initialize_quantizers(student)
        distill = DistillConfig(contrastive_weight=0.1 if setting == "quantgpt" else 0.0)
        module = DistillModule(student, teacher, distill, optim, a.steps).to(dev)
        if distill.uses_contrastive:
            bank = MemoryBank(a.vocab, a.width).to(dev)
            module.attach_memory_bank(bank)
    module.log = lambda *args, **kw: None  # no Trainer attached
    module.train()
    opt = torch.optim.AdamW(module.param_groups(), lr=1e-4)
    times = []
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = module.training_step(batch, i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bank is not None:
            bank.update(*module.pop_bank_update())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    step = statistics.median(times)
    return {"setting": setting, "step_s": step, "peak_mib": peak, "tokens_per_s": a.batch * a.block / step,
            "loss": float(loss), "device": str(dev), "precision": a.precision}


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
    ap.add_argument("--size", choices=tuple(SIZES), default=None, help="layers/width/vocab preset (overrides them)")
    ap.add_argument("--json", action="store_true", help="also print every row as a JSON line")
    ap.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.size:
        a.layers, a.width, a.vocab = SIZES[a.size]
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    rows = []
    for s in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", s], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: setting {s} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = {r["setting"]: r for r in rows}
    print(f"{a.layers} x {a.width} GPT-2, vocab {a.vocab}, batch {a.batch} x {a.block}, {a.device}, {a.precision}, "
          f"median of {a.steps} steps after {a.warmup}")
    memory = "GPU allocated" if a.device != "cpu" else "process RSS"
    print(f"| setting | step time (s) | vs kd_only | vs fp | tokens/s | peak memory (MiB, {memory}) | vs kd_only |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['step_s']:.3f} | {r['step_s'] / ref['kd_only']['step_s']:.2f}x | "
              f"{r['step_s'] / ref['fp']['step_s']:.2f}x | {r['tokens_per_s']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / ref['kd_only']['peak_mib']:.2f}x |")
    if a.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
