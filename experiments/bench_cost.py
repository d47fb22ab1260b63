"""Benchmark: training cost of QuantGPT against KD-only and FP fine-tuning (issue #3).

Each setting runs in its own process (so peak memory is its own): the same model, batch and
data; `--steps` optimizer steps after `--warmup` untimed ones; prints a markdown table of the
median step time and the peak memory (CPU: peak RSS of the process; GPU: peak allocated).

    python experiments/bench_cost.py [--layers 4 --width 256 --vocab 8192 --block 128 --batch 16 --steps 20]

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


def measure(setting: str, a: argparse.Namespace) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from qgplm.config import DistillConfig, OptimConfig
    from qgplm.distill import MemoryBank
    from qgplm.module import DistillModule, TeacherModule
    from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model

    torch.manual_seed(0)
    dev = torch.device(a.device)
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
        student = quantize_model(copy.deepcopy(teacher), QuantConfig(weight_bits=2, embedding_bits=2, activation_bits=8, quantizer=quantizer))
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
    for i in range(a.warmup + a.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
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
    return {"setting": setting, "step_s": statistics.median(times), "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    rows = []
    for s in SETTINGS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", s], capture_output=True, text=True,
                             check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = {r["setting"]: r for r in rows}
    print(f"| setting | step time (s) | vs kd_only | vs fp | peak memory (MiB, {'GPU allocated' if a.device != 'cpu' else 'process RSS'}) | vs kd_only |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['step_s']:.3f} | {r['step_s'] / ref['kd_only']['step_s']:.2f}x | "
              f"{r['step_s'] / ref['fp']['step_s']:.2f}x | {r['peak_mib']:.0f} | {r['peak_mib'] / ref['kd_only']['peak_mib']:.2f}x |")


if __name__ == "__main__":
    main()
