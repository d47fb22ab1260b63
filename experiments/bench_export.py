"""CPU inference benchmark: FP32 vs packed export (dequantize, int8 and lowbit modes) vs llama.cpp (gguf).

    PYTHONPATH=. python experiments/bench_export.py [--models gpt2 bart] [--run <run dir> ...] [--threads 2]
    PYTHONPATH=. python experiments/bench_export.py --memory-only [--models gpt2 bart]   # loading memory only

Full-size random-init GPT-2 small and BART-base (shape of bart-base); the packed model is a W2E2A8
post-training export (random weights: only speed and memory are measured here, not quality).
Each (model, mode) runs in its own subprocess, so resident memory (RSS) is not shared:
- load s: from_pretrained (FP32) or qgplm.load_quantized (packed), from a warm page cache;
- resident weights MiB: resident set after loading and one 1-token forward (which touches every
  weight: FP32 from_pretrained memory-maps the file) minus before loading (after all imports,
  onnxruntime's included, and after every mode's kernels ran once on a tiny layer, so that library
  code pages are in the baseline), freed heap returned to the system first (malloc_trim): the
  weights as they sit in RAM, whoever holds them (torch tensors or onnxruntime's packed kernels);
- RSS MiB: the same after the forward and generate runs (adds activations, KV cache, logits);
- gguf (GPT-2 only: llama.cpp has no BART): the export written with format=gguf, run by llama.cpp
  through llama-cpp-python (qgplm.export.runtimes.llamacpp.LlamaCppLM, token ids in and out, greedy, KV cache).
  llama.cpp memory-maps model.gguf and computes on it in place, so its resident weights are the
  resident pages of that mapping (/proc/self/smaps); the process growth after loading and one
  token ("RSS 1st token") also holds the KV cache and compute buffer llama.cpp reserves for its
  context (n_ctx = 256 cells at least, n_ubatch = --seq);
- weights MiB: bytes of the tensors the model holds (parameters + buffers, shared ones once);
- fwd tok/s: one forward of a batch of 1 x --seq tokens (BART: same length encoder and decoder);
- gen tok/s: greedy HF generate of --new tokens after a --prompt token prompt (KV cache on), best of --repeat;
- gen CPU ms/tok: process CPU time (all threads) per generated token, same run.
Also times the candidate int8 kernels on one 768x3072 layer (--kernels).

--memory-only measures loading memory as a user sees it (`top`'s RES: VmRSS, no malloc_trim), each
(model, mode) in its own fresh subprocess: base = RSS after imports and the kernels' warm-up, peak =
VmHWM while loading (the high-water mark is reset just before: /proc/self/clear_refs), steady = RSS
after one 1-token forward. fp32 is the model class built from the HF config, then the FP32 state
dict (safetensors) loaded into it. Prints growth over base, FP32 growth / mode growth, peak / steady,
and whether each ratio meets its target (peak / steady <= 1.25 in every mode; FP32 growth / growth
>= 3x for int8, >= 4x for lowbit). Default models: GPT-2 small and BART-base, every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2**20


def rss() -> int:
    """Resident set in bytes, after handing freed heap back to the system (glibc's malloc_trim),
    so that memory freed by loading (file buffers, temporaries) is not counted."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def vm_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now; VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, shared tensors once (oneDNN's prepacked int8 weights are
    opaque tensors without a data pointer: counted by their element count)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_mkldnn else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _timeit(fn, repeat: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) of the fastest of `repeat` runs after a warm-up. CPU time
    is less sensitive than wall time to other processes sharing the cores."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def mapped_rss(path: str) -> int:
    """Resident bytes of this process's memory maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                inside = len(head) >= 6 and head[5] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def gguf_worker(args: argparse.Namespace) -> None:
    """The gguf mode's measurements: llama.cpp through llama-cpp-python, same figures as worker()."""
    import numpy as np

    from qgplm.export.runtimes.llamacpp import LlamaCppLM, gguf_path

    path = str(gguf_path(args.dir).resolve())
    n_ctx = max(args.seq, args.prompt + args.new)
    warm = LlamaCppLM(args.dir, n_ctx=n_ctx, threads=args.threads)  # library code pages into the baseline
    warm.logits([5])
    warm.close()
    del warm
    base = rss()
    t = time.perf_counter()
    lm = LlamaCppLM(args.dir, n_ctx=n_ctx, threads=args.threads)
    load_s = time.perf_counter() - t
    vocab = lm.llm.n_vocab()
    rng = np.random.default_rng(0)
    lm.logits([int(rng.integers(3, vocab - 1))])
    rss_load, weights = rss() - base, mapped_rss(path)
    seq = rng.integers(3, vocab - 1, args.seq).tolist()
    prompt = rng.integers(3, vocab - 1, args.prompt).tolist()
    fwd = _timeit(lambda: lm.logits(seq), args.repeat)
    g = _timeit(lambda: lm.greedy(prompt, args.new), args.repeat)
    print(json.dumps({"load_s": load_s, "rss_weights_mib": weights / MIB, "rss_1tok_mib": rss_load / MIB,
                      "rss_mib": (rss() - base) / MIB, "weights_mib": Path(path).stat().st_size / MIB,
                      "fwd_tok_s": args.seq / fwd[0], "gen_tok_s": args.new / g[0],
                      "gen_cpu_ms_tok": 1e3 * g[1] / args.new}))


def _warm_kernels(threads: int) -> None:
    """Run every mode's kernels once on a tiny layer before the baseline RSS, in every mode: the
    libraries' code pages (onnxruntime's MLAS, oneDNN) are then in the baseline, not counted as
    weights."""
    from qgplm.export.runtimes.int8 import Int8Linear
    from qgplm.export.runtimes.lowbit import LowBitLinear, _SessionFactory
    from qgplm.quant import ActivationQuantizer

    codes, step, x = torch.randint(-1, 2, (64, 64), dtype=torch.int8), torch.tensor(0.01), torch.randn(2, 64)
    with torch.inference_mode():
        torch.nn.functional.linear(x, codes.float())
        Int8Linear(codes, step, None, ActivationQuantizer(8))(x)
        Int8Linear(codes, step, None, ActivationQuantizer(8), "int_mm")(x)
        LowBitLinear(codes, step, 2, None, _SessionFactory(threads))(x)


def load_fp32_from_config(path: str, model_kind: str) -> torch.nn.Module:
    """The FP32 baseline of --memory-only: the class built from config.json, then the state dict."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if model_kind == "bart" else AutoModelForCausalLM
    model = cls.from_config(AutoConfig.from_pretrained(path))
    state = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)  # tied copies are not in the file
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    del state
    if unexpected or any(params[k].data_ptr() not in loaded for k in missing if k in params):
        raise SystemExit(f"error: {path} does not match its config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def memory_worker(args: argparse.Namespace) -> None:
    """Loading memory as `top` shows it (no malloc_trim): base, peak while loading, steady after 1 token."""
    import gc

    import onnxruntime  # noqa: F401 - imported before the baseline RSS in every mode
    import transformers  # noqa: F401

    import qgplm.export.loader as loader
    import qgplm.export.runtimes.lowbit  # noqa: F401

    _warm_kernels(args.threads)
    gc.collect()
    base = vm_status("VmRSS")
    if not reset_peak():
        raise SystemExit("error: cannot reset the peak RSS (/proc/self/clear_refs): run on Linux")
    t = time.perf_counter()
    if args.mode == "fp32":
        model = load_fp32_from_config(args.dir, args.model)
    else:
        model = loader.load_quantized(args.dir, args.mode)
    load_s = time.perf_counter() - t
    peak = vm_status("VmHWM")
    one = torch.full((1, 1), 5)
    with torch.inference_mode():
        model(input_ids=one, **({"decoder_input_ids": one} if args.model == "bart" else {}))
    steady = vm_status("VmRSS")
    print(json.dumps({"load_s": load_s, "base_mib": base / MIB, "peak_mib": peak / MIB, "steady_mib": steady / MIB,
                      "weights_mib": held_bytes(model) / MIB}))


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.memory_only:
        return memory_worker(args)
    if args.mode == "gguf":
        return gguf_worker(args)
    import onnxruntime  # noqa: F401 - imported before the baseline RSS in every mode
    import transformers  # noqa: F401

    import qgplm.export.loader as loader
    import qgplm.export.runtimes.lowbit  # noqa: F401

    _warm_kernels(args.threads)
    base = rss()
    t = time.perf_counter()
    if args.mode == "fp32":
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        cls = AutoModelForSeq2SeqLM if args.model == "bart" else AutoModelForCausalLM
        model = cls.from_pretrained(args.dir).eval()
    else:
        model = loader.load_quantized(args.dir, args.mode)
    load_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    one = torch.randint(3, vocab - 1, (1, 1), generator=gen)
    with torch.inference_mode():
        model(input_ids=one, **({"decoder_input_ids": one} if args.model == "bart" else {}))
    rss_load = rss() - base
    seq = torch.randint(3, vocab - 1, (1, args.seq), generator=gen)
    prompt = torch.randint(3, vocab - 1, (1, args.prompt), generator=gen)
    kw = {"decoder_input_ids": seq} if args.model == "bart" else {}
    with torch.inference_mode():
        fwd = _timeit(lambda: model(input_ids=seq, **kw), args.repeat)
        g = _timeit(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                                           min_new_tokens=args.new, do_sample=False, pad_token_id=0), args.repeat)
    # after running: from_pretrained memory-maps safetensors, so FP32 weights become resident
    # only when first used; this is the steady-state inference footprint
    rss_run = rss() - base
    print(json.dumps({"load_s": load_s, "rss_weights_mib": rss_load / MIB, "rss_1tok_mib": rss_load / MIB,
                      "rss_mib": rss_run / MIB,
                      "weights_mib": held_bytes(model) / MIB, "fwd_tok_s": args.seq / fwd[0],
                      "gen_tok_s": args.new / g[0], "gen_cpu_ms_tok": 1e3 * g[1] / args.new}))


def kernels(threads: int) -> list[str]:
    """Median time of one 768 -> 3072 layer with each candidate CPU kernel (torchao's if installed)."""
    import warnings

    from qgplm.export.runtimes.int8 import Int8Linear
    from qgplm.quant import ActivationQuantizer

    torch.set_num_threads(threads)
    k, n = 768, 3072
    lin = torch.nn.Linear(k, n).eval()
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    cands = {"fp32 F.linear": lin}
    for kernel in ("onednn", "int_mm"):
        cands[f"qgplm Int8Linear {kernel}"] = Int8Linear(codes, torch.tensor(0.01), lin.bias, ActivationQuantizer(8),
                                                         kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cands["quantize_dynamic (fbgemm)"] = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        try:
            import copy

            import torchao.quantization as tq

            for cfg in ("Int8DynamicActivationInt8WeightConfig", "Int8DynamicActivationIntxWeightConfig"):
                m = copy.deepcopy(torch.nn.Sequential(lin))
                tq.quantize_(m, getattr(tq, cfg)())
                cands[f"torchao {cfg}"] = m
        except ImportError:
            pass
    from qgplm.export.runtimes.lowbit import LowBitLinear, _SessionFactory

    for block, acc in ((32, 4), (64, 4), (128, 4), (256, 4), (64, 0)):
        cands[f"MatMulNBits 2-bit block {block} acc {acc}"] = LowBitLinear(
            codes, torch.tensor(0.01), 2, lin.bias, _SessionFactory(threads), block, acc)
    out = ["| rows M | " + " | ".join(f"{c} us" for c in cands) + " | raw _int_mm us |",
           "|---|" + "---|" * (len(cands) + 1)]
    for m in (1, 16, 128):
        x = torch.randn(m, k)
        q = torch.randint(-128, 127, (m, k), dtype=torch.int8)
        with torch.inference_mode():
            ts = [_median(lambda f=f, x=x: f(x)) for f in cands.values()]
            ts.append(_median(lambda q=q: torch._int_mm(q, codes.t())))
        out.append(f"| {m} | " + " | ".join(f"{t * 1e6:.0f}" for t in ts) + " |")
    return out


def _median(fn, n: int = 50) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]


def random_init_dirs(name: str, tmp: Path, modes: list[str]) -> tuple[str, dict[str, Path]]:
    """(kind, mode -> dir) of a full-size random-init model and its W2E2A8 post-training exports."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from size_export import build

    from qgplm.export import export_model
    from qgplm.export.converters.gguf import export_gguf
    from qgplm.quant import QuantConfig

    quant = QuantConfig(weight_bits=2, embedding_bits=2, quantizer_kwargs={"gamma_init": "fixed"})
    model = build(name).eval()
    model.save_pretrained(tmp / f"{name}-fp32")
    export_model(model, tmp / f"{name}-w2e2", quant_config=quant)
    if any(m.endswith("_compact") for m in modes):
        export_model(model, tmp / f"{name}-w2e2c", position_bits=8, fp16=True, quant_config=quant)
    dirs = {m: tmp / (f"{name}-w2e2c" if m.endswith("_compact") else f"{name}-w2e2") for m in modes if m != "gguf"}
    dirs["fp32"] = tmp / f"{name}-fp32"
    if "gguf" in modes and name == "gpt2":
        export_gguf(tmp / f"{name}-w2e2", tmp / f"{name}-gguf")
        dirs["gguf"] = tmp / f"{name}-gguf"
    return name, dirs


def trained_dirs(run: Path, tmp: Path, modes: list[str]) -> tuple[str, dict[str, Path]]:
    """(kind, mode -> dir) of a trained run: its FP32 teacher (same shape as the student) and its export."""
    from transformers import AutoConfig

    from qgplm.export.converters.gguf import export_gguf

    seq2seq = AutoConfig.from_pretrained(run / "export").is_encoder_decoder
    dirs = {m: run / "export" for m in modes if not m.endswith("_compact") and m != "gguf"}
    dirs["fp32"] = run / "teacher"
    if "gguf" in modes and not seq2seq:
        export_gguf(run / "export", tmp / f"{run.name}-gguf")
        dirs["gguf"] = tmp / f"{run.name}-gguf"
    return ("bart" if seq2seq else "gpt2"), dirs


# loading-memory targets (docs/deploy.md, "Loading memory"): peak while loading over steady RSS, for
# every mode; FP32's growth over the mode's growth, for the kernel modes
PEAK_OVER_STEADY = 1.25
GROWTH_RATIO = {"int8": 3.0, "lowbit": 4.0}


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def memory_table(rows: list[tuple[str, str, dict]], threads: int) -> list[str]:
    """The --memory-only table: RSS as `top` shows it, growth over the process before loading, and
    each ratio against its target."""
    out = [f"threads={threads}; RSS = VmRSS without malloc_trim; growth = steady - base; targets: peak / steady "
           f"<= {PEAK_OVER_STEADY} (every qgplm mode), FP32 growth / growth >= "
           + ", ".join(f"{r:g}x ({m})" for m, r in GROWTH_RATIO.items()),
           "| model | mode | base MiB | peak MiB | steady MiB | growth MiB | FP32 growth / growth | growth target "
           "| peak / steady | peak target | load s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode, r in rows:
        ref = next((x for n, m, x in rows if n == name and m == "fp32"), None)
        growth = r["steady_mib"] - r["base_mib"]
        ratio = None if ref is None else (ref["steady_mib"] - ref["base_mib"]) / growth
        want = GROWTH_RATIO.get(mode)
        growth_target = "" if want is None or ratio is None else f">= {want:g}x: {_met(ratio >= want)}"
        peak = r["peak_mib"] / r["steady_mib"]
        peak_target = "" if mode == "fp32" else f"<= {PEAK_OVER_STEADY}: {_met(peak <= PEAK_OVER_STEADY)}"
        out.append(f"| {name} | {mode} | {r['base_mib']:.0f} | {r['peak_mib']:.0f} | {r['steady_mib']:.0f} | "
                   f"{growth:.0f} | {'' if ratio is None else f'{ratio:.2f}x'} | {growth_target} | {peak:.2f} | "
                   f"{peak_target} | {r['load_s']:.1f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["gpt2", "bart"], help="full-size random-init shapes")
    ap.add_argument("--run", nargs="*", type=Path, default=[],
                    help="trained run dirs (teacher/ as FP32, export/ as the student)")
    ap.add_argument("--modes", nargs="+", default=None,
                    help="*_compact: that mode on an export with position_bits=8 fp16=true; gguf: GPT-2 only "
                         "(default: all; with --memory-only: fp32 dequantize int8 lowbit)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only loading memory (peak while loading, steady after one token), no timings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--mode")
    ap.add_argument("--dir")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.modes is None:
        args.modes = (["fp32", "dequantize", "int8", "lowbit"] if args.memory_only else
                      ["fp32", "dequantize", "int8", "int8_compact", "lowbit", "lowbit_compact", "gguf"])
    if args.memory_only and "gguf" in args.modes:
        raise SystemExit("error: --memory-only measures qgplm's loaders: drop gguf from --modes")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = [(name, random_init_dirs(name, Path(tmp), args.modes)) for name in args.models]
        targets += [(f"{run.name} (trained)", trained_dirs(run, Path(tmp), args.modes)) for run in args.run]
        for name, (kind, dirs) in targets:
            for mode in args.modes:
                if mode not in dirs:
                    print(name, mode, "skipped: llama.cpp runs GPT-2 only")
                    continue
                cmd = [sys.executable, __file__, "--worker", "--model", kind, "--mode", mode.removesuffix("_compact"),
                       "--dir", str(dirs[mode]), "--threads", str(args.threads), "--seq", str(args.seq),
                       "--prompt", str(args.prompt), "--new", str(args.new), "--repeat", str(args.repeat),
                       *(["--memory-only"] if args.memory_only else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append((name, mode, r))
                print(name, mode, r, flush=True)
    if args.memory_only:
        print("\n".join(memory_table(rows, args.threads)))
        return
    print(f"\nthreads={args.threads}, forward 1x{args.seq} tokens, generate {args.new} tokens after {args.prompt}")
    print("| model | mode | load s | resident weights MiB | vs FP32 | RSS 1st token MiB | RSS after runs MiB "
          "| weights held MiB | fwd tok/s | fwd speed-up | gen tok/s | gen CPU ms/tok | gen speed-up vs FP32 (wall) "
          "| vs int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, mode, r in rows:
        ref = next((x for n, m, x in rows if n == name and m == "fp32"), r)
        i8 = next((x for n, m, x in rows if n == name and m == "int8"), r)
        print(f"| {name} | {mode} | {r['load_s']:.2f} | {r['rss_weights_mib']:.1f} | "
              f"{ref['rss_weights_mib'] / r['rss_weights_mib']:.2f}x | {r['rss_1tok_mib']:.1f} | {r['rss_mib']:.0f} | "
              f"{r['weights_mib']:.1f} | "
              f"{r['fwd_tok_s']:.0f} | {r['fwd_tok_s'] / ref['fwd_tok_s']:.2f}x | {r['gen_tok_s']:.1f} | "
              f"{r['gen_cpu_ms_tok']:.0f} | {r['gen_tok_s'] / ref['gen_tok_s']:.2f}x | "
              f"{r['gen_tok_s'] / i8['gen_tok_s']:.2f}x |")
    if not args.no_kernels:
        print(f"\nkernel candidates, one 768x3072 layer, threads={args.threads} (median of 50):")
        print("\n".join(kernels(args.threads)))


if __name__ == "__main__":
    main()
