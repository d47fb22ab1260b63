"""qgplm's low-bit students against llama.cpp's own post-training quantization of the same teacher,
every row built as a GGUF file and measured through llama.cpp (llama-cpp-python), side by side.

    python experiments/llamacpp_compare.py --teacher <teacher run dir or HF dir> \
        --student <student run dir> [--student ...] [--shipped <a .gguf of the pretrained model>] \
        [--data ../shared/data/wikitext-2] [--tokens 32768] [--threads 2] [--cache <dir>] [--rows ...]

Rows:
- the teacher at F16 (qgplm/export/converters/gguf_float.py: the layout and tokenizer of format=gguf), and a
  shipped file of the pretrained model (before fine-tuning), if given;
- llama.cpp's quantization of that F16 file with `llama_model_quantize` (llama.cpp's own choice of
  type per tensor, with its fallbacks where a row is not a multiple of the type's block): Q4_0,
  Q2_K, TQ2_0, Q2_0, and IQ2_XS / IQ2_XXS with an importance matrix;
- each student exported with format=gguf (2-bit rows that are not a multiple of 256 as Q2_0 and,
  as a second row, as Q4_0).

Importance matrix: llama-cpp-python ships no llama-imatrix, so it is gathered here as llama-imatrix
computes it (the mean over tokens of the squared input of every blk.* matrix multiplication, the
output matrix left out as llama-imatrix does by default), with PyTorch on the teacher's HF weights
over the first --imatrix-tokens tokens of the training split in chunks of 512, and handed to
`llama_model_quantize` through its `imatrix` parameter.

Measured for every row, each in a fresh subprocess that imports only numpy and llama_cpp:
- WikiText-2 test perplexity through llama.cpp, qgplm's protocol (qgplm/data/token_stream.py): the test text
  tokenized line by line with the teacher's tokenizer, the first --tokens ids, windows of --block
  tokens advancing by --block - 1, every token after the first scored once, PPL = exp(mean NLL),
  the NLL computed here from llama.cpp's logits (a fresh context per window);
- file size, bits per weight over the weight (2-D) tensors, the types llama.cpp holds them in;
- resident memory: the process's VmRSS after loading the file (mmap) and one 64-token eval;
- speed at batch 1 on --threads threads: prompt processing of 64 tokens and generation of 32
  tokens one at a time (the best of 3), tokens per second;
- for the teacher and each student, the same perplexity computed in PyTorch on the same tokens and
  windows (the FP32 teacher; the fake-quant student as it trained, its 8-bit activations included)
  and how far llama.cpp's is from it: llama.cpp rounds the student's steps to fp16 and quantizes
  activations its own way (8-bit per block of 32), so this column is the cost of the runtime.

Built files are cached in --cache (default experiments/results/llamacpp_compare, git-ignored) and
reused; --rebuild builds them again.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# llama.h's LLAMA_FTYPE_MOSTLY_* of llama.cpp's own quantization rows
PTQ_FTYPES = {"Q4_0": 2, "Q2_K": 10, "TQ2_0": 37, "Q2_0": 41, "IQ2_XS": 20, "IQ2_XXS": 19}
NEEDS_IMATRIX = ("IQ2_XS", "IQ2_XXS")
ALL_ROWS = ("teacher_f16", "shipped", "Q4_0", "Q2_K", "TQ2_0", "Q2_0", "IQ2_XS", "IQ2_XXS", "students")
PROMPT, GENERATE, REPEATS = 64, 32, 3


class CompareError(Exception):
    """Bad input: printed as one `error: ...` line, exit code 2."""


# ---------------------------------------------------------------- the protocol (numpy only)


def eval_windows(n: int, block: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position inside the window) of qgplm's evaluation windows
    (qgplm/data/token_stream.py EvalWindows): every token after the first is scored exactly once."""
    if n < block + 1:
        raise CompareError(f"{n} tokens are fewer than one window ({block}) + 1: lower --block or raise --tokens")
    stride = min(stride, block - 1)
    starts = list(range(0, n - block + 1, stride))
    if starts[-1] + block < n:
        starts.append(n - block)
    out = [(starts[0], 1)]
    for prev, s in zip(starts, starts[1:], strict=False):
        out.append((s, prev + block - s))
    return out


def window_nll(logits: np.ndarray, ids: np.ndarray, first: int) -> tuple[float, int]:
    """(sum of NLL, count) of ids[first:] given logits[j - 1] for token j (float64 log-softmax)."""
    x = logits[first - 1: len(ids) - 1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
    target = x[np.arange(x.shape[0]), ids[first:]]
    return float((lse - target).sum()), int(x.shape[0])


def torch_perplexity(model, ids: np.ndarray, block: int, stride: int) -> float:
    """The same perplexity as `measure`'s, from a PyTorch model's logits (same windows, same NLL)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start, first in eval_windows(len(ids), block, stride):
            window = ids[start: start + block]
            logits = model(input_ids=torch.from_numpy(window.astype(np.int64))[None]).logits[0].float().numpy()
            a, b = window_nll(logits, window, first)
            nll, count = nll + a, count + b
    return math.exp(nll / count)


def cached_torch_ppl(cache: Path, key: str, compute) -> float:
    """`compute()` once per key (source, tokens, windows), kept in cache/torch_ppl.json."""
    f = cache / "torch_ppl.json"
    known = json.loads(f.read_text()) if f.is_file() else {}
    if key not in known:
        t0 = time.time()
        known[key] = compute()
        print(f"PyTorch PPL {key}: {known[key]:.2f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        f.write_text(json.dumps(known, indent=1))
    return known[key]


# ---------------------------------------------------------------- a GGUF file's tensor table (llama.cpp's reader)


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_get_n_tensors.restype, lib.gguf_get_n_tensors.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    for fn, res in (("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_size", ctypes.c_size_t)):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    return lib


@dataclass
class TensorInfo:
    name: str
    type: str
    elements: int
    nbytes: int


def tensor_table(path: str | Path) -> list[TensorInfo]:
    """Every tensor of a GGUF file as llama.cpp's gguf reader sees it (type, weights, bytes)."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise CompareError(f"llama.cpp cannot read {path} as GGUF: build it again (--rebuild) or fix the path")
    try:
        out = []
        for i in range(lib.gguf_get_n_tensors(ctx)):
            t = lib.gguf_get_tensor_type(ctx, i)
            nbytes = lib.gguf_get_tensor_size(ctx, i)
            out.append(TensorInfo(lib.gguf_get_tensor_name(ctx, i).decode(), lib.ggml_type_name(t).decode(),
                                  nbytes // lib.ggml_type_size(t) * lib.ggml_blck_size(t), nbytes))
        return out
    finally:
        lib.gguf_free(ctx)


def is_weight(t: TensorInfo) -> bool:
    """The matrices (token embedding, projections, output): not the norms and biases."""
    return t.name.endswith(".weight") and "norm" not in t.name


def weight_bits(table: list[TensorInfo]) -> float:
    w = [t for t in table if is_weight(t)]
    return 8 * sum(t.nbytes for t in w) / sum(t.elements for t in w)


def type_mix(table: list[TensorInfo]) -> str:
    """The weight tensors' types, most weights first, e.g. "Q4_0 71%, Q2_0 29%"."""
    held: dict[str, int] = {}
    for t in filter(is_weight, table):
        held[t.type] = held.get(t.type, 0) + t.elements
    total = sum(held.values())
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(held.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- llama.cpp's quantization


def quantize(src: Path, dst: Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None, threads: int = 2) -> None:
    """llama.cpp's `llama_model_quantize` of a float GGUF file to `ftype` (its own per-tensor types)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = PTQ_FTYPES[ftype]
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for e, (name, values) in zip(entries, imatrix.items(), strict=False):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            e.name = name.encode()
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = arr.size
        params.imatrix = entries
        keep.append(entries)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise CompareError(f"llama_model_quantize {src.name} -> {ftype} failed (code {rc}); see llama.cpp's log above")
    tmp.replace(dst)


# ---------------------------------------------------------------- one row's measurement (fresh subprocess)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str | Path, ids: np.ndarray, threads: int, block: int, stride: int) -> dict[str, float]:
    """RSS after load + one eval, pp/tg tokens per second at batch 1, and the perplexity of `ids`."""
    import llama_cpp

    def load(logits_all: bool) -> llama_cpp.Llama:
        return llama_cpp.Llama(model_path=str(path), n_ctx=max(block, PROMPT + GENERATE), n_batch=block,
                               n_ubatch=block, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               use_mmap=True, verbose=False)

    prompt = [int(i) for i in ids[:PROMPT]]
    gen = [int(i) for i in ids[PROMPT: PROMPT + GENERATE]]
    llm = load(False)
    llm.eval(prompt)
    rss = _rss_mib()
    pp, tg = math.inf, math.inf
    for _ in range(REPEATS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for tok in gen:
            llm.eval([tok])
        t2 = time.perf_counter()
        pp, tg = min(pp, t1 - t0), min(tg, t2 - t1)
    llm.close()
    llm = load(True)
    nll, count = 0.0, 0
    for start, first in eval_windows(len(ids), block, stride):
        window = ids[start: start + block]
        llm.reset()
        llm.eval([int(i) for i in window])
        s, c = window_nll(np.asarray(llm.scores[:block], dtype=np.float32), window, first)
        nll, count = nll + s, count + c
    llm.close()
    return {"ppl": math.exp(nll / count), "scored": count, "rss_mib": rss, "pp_tok_s": PROMPT / pp,
            "tg_tok_s": GENERATE / tg}


def measure_in_subprocess(path: Path, ids_file: Path, threads: int, block: int, stride: int) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(path), "--ids", str(ids_file),
           "--threads", str(threads), "--block", str(block), "--stride", str(stride)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise CompareError(f"measuring {path} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- building the rows (torch, transformers, qgplm)


def hf_dir(run_dir: Path) -> Path:
    """The teacher's HF model dir: the run dir's teacher/ (qgplm.run stage=teacher), or the dir itself."""
    for d in (run_dir / "teacher", run_dir):
        if (d / "config.json").is_file():
            return d
    raise CompareError(f"{run_dir} holds no HF model (config.json, in it or in teacher/): pass the teacher run dir of "
                       f"python -m qgplm.run stage=teacher")


def test_ids(tokenizer, data_dir: Path, tokens: int) -> np.ndarray:
    """qgplm's tokenization of the WikiText-2 test split (line by line, newlines kept), its first `tokens`."""
    from qgplm.data.token_stream import tokenize_stream

    f = data_dir / "wiki.test.tokens"
    if not f.is_file():
        raise CompareError(f"{f} does not exist: pass --data <folder with wiki.test.tokens>")
    return tokenize_stream(tokenizer, f.read_text(encoding="utf-8"))[:tokens].numpy().astype(np.int32)


def collect_imatrix(model, ids: np.ndarray, chunk: int = 512) -> dict[str, np.ndarray]:
    """llama-imatrix's importance matrix of every blk.* matrix: the mean over tokens of the squared
    input of the matrix multiplication (per input column), GGUF tensor names as keys."""
    import torch

    from qgplm.export.converters.gguf_arch import arch_of

    arch, _ = arch_of(type(model).__name__, model.config)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = arch.gguf_name(f"{mname}.weight")
        if gname is None or not gname.startswith("blk."):
            continue

        def hook(_m, inp, _out, gname=gname):
            x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
            counts[gname] = counts.get(gname, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for s in range(0, len(ids) - chunk + 1, chunk):
                model(torch.as_tensor(ids[s: s + chunk], dtype=torch.long)[None])
    finally:
        for h in hooks:
            h.remove()
    if not sums:
        raise CompareError(f"no tokens for the importance matrix: raise --imatrix-tokens to at least {chunk}")
    return {k: (v / counts[k]).numpy().astype(np.float32) for k, v in sums.items()}


@dataclass
class Row:
    label: str
    source: str
    path: Path | None = None
    why_not: str = ""
    result: dict = field(default_factory=dict)
    kind: str = ""  # its name in --rows
    torch_ppl: float | None = None  # the same perplexity in PyTorch: FP32 teacher, fake-quant student


def build_rows(args: argparse.Namespace, cache: Path) -> tuple[list[Row], Path]:
    """Every requested row's GGUF file (built or taken from the cache), and the test ids' .npy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgplm.export.converters.gguf_float import export_gguf_float

    teacher = hf_dir(Path(args.teacher).expanduser())
    record = cache / "source.json"
    source = {"teacher": str(teacher.resolve()), "imatrix_tokens": args.imatrix_tokens}  # what the files depend on
    if record.is_file() and json.loads(record.read_text()) != source and not args.rebuild:
        raise CompareError(f"{cache} was built from {json.loads(record.read_text())}, not {source}: pass --rebuild or "
                           f"another --cache")
    cache.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(source))
    fresh = args.rebuild

    def todo(p: Path) -> bool:
        return fresh or not p.is_file()

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(teacher, local_files_only=True)
    ids_file = cache / f"wt2_test_ids_{args.tokens}.npy"
    if todo(ids_file):
        np.save(ids_file, test_ids(tokenizer, Path(args.data), args.tokens))
    rows: list[Row] = []
    want = set(args.rows)
    f16 = cache / "teacher-F16.gguf"
    model = None
    if todo(f16):
        model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True, dtype=torch.float32).eval()
        export_gguf_float(model, f16, tokenizer, "f16", name="teacher")
    if "teacher_f16" in want:
        row = Row("teacher F16", "fine-tuned teacher, qgplm gguf_float", f16, kind="teacher_f16")

        def teacher_ppl() -> float:
            m = model or AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True,
                                                              dtype=torch.float32).eval()
            return torch_perplexity(m, np.load(ids_file), args.block, args.stride)

        row.torch_ppl = cached_torch_ppl(cache, f"teacher|{args.tokens}|{args.block}|{args.stride}", teacher_ppl)
        rows.append(row)
    if "shipped" in want and args.shipped:
        p = Path(args.shipped).expanduser()
        if not p.is_file():
            raise CompareError(f"--shipped {p} does not exist: pass the path of a .gguf file")
        rows.append(Row(f"pretrained {p.stem.split('.')[-1]} (shipped file)", "pretrained, NOT fine-tuned", p,
                        kind="shipped"))
    for ftype in PTQ_FTYPES:
        if ftype not in want:
            continue
        out = cache / f"teacher-{ftype}.gguf"
        row = Row(f"llama.cpp {ftype}", "llama_model_quantize of teacher F16" +
                  (" + imatrix" if ftype in NEEDS_IMATRIX else ""), out, kind=ftype)
        if todo(out):
            imatrix = None
            if ftype in NEEDS_IMATRIX:
                imatrix_file = cache / "imatrix.npz"
                if todo(imatrix_file):
                    if model is None:
                        model = AutoModelForCausalLM.from_pretrained(teacher, local_files_only=True,
                                                                     dtype=torch.float32).eval()
                    train = Path(args.data) / "wiki.train.tokens"
                    from qgplm.data.token_stream import tokenize_stream

                    text = train.read_text(encoding="utf-8")[: args.imatrix_tokens * 16]
                    calib = tokenize_stream(tokenizer, text)[: args.imatrix_tokens].numpy()
                    np.savez(imatrix_file, **collect_imatrix(model, calib))
                imatrix = dict(np.load(imatrix_file))
            try:
                quantize(f16, out, ftype, imatrix, args.threads)
            except CompareError as e:
                row.path, row.why_not = None, str(e)
        rows.append(row)
    if "students" in want:
        rows += build_students(args, cache, fresh)
    return sorted(rows, key=lambda r: args.rows.index(r.kind)), ids_file  # measured in the order asked


def build_students(args: argparse.Namespace, cache: Path, fresh: bool) -> list[Row]:
    """format=gguf of each student run, one file per `--student-2bit` layout of the 2-bit rows that are not a
    multiple of 256 (Q2_0: 2.25 bits, no fast x86 kernel; Q4_0: 4.5 bits, fast kernels; both exact)."""
    from qgplm.export.converters.gguf import GGUF_FILE, export_gguf
    from qgplm.train.student import load_student

    rows = []
    ids = np.load(cache / f"wt2_test_ids_{args.tokens}.npy")
    for spec in args.student:
        run = Path(spec).expanduser()
        name = "/".join(run.resolve().parts[-2:])
        key = f"student {run.resolve()}|{args.tokens}|{args.block}|{args.stride}"
        ppl = cached_torch_ppl(cache, key, lambda run=run: torch_perplexity(load_student(str(run))[0].eval(), ids,
                                                                            args.block, args.stride))
        variants = []
        for two_bit in args.student_2bit:
            out = cache / f"student-{name.replace('/', '-')}-{two_bit}"
            if fresh or not (out / GGUF_FILE).is_file():
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                model, tokenizer = load_student(str(run))
                export_gguf(model, out, tokenizer, gguf_2bit=two_bit)
            variants.append((two_bit, out / GGUF_FILE))
        mixes = {t: type_mix(tensor_table(p)) for t, p in variants}
        for i, (two_bit, p) in enumerate(variants):
            if i and mixes[two_bit] in [mixes[t] for t, _ in variants[:i]]:
                continue  # no 2-bit row that the option changes (e.g. a W4 student)
            label = f" (gguf_2bit={two_bit})" if len(variants) == 1 or len(set(mixes.values())) > 1 else ""
            rows.append(Row(f"qgplm {name}{label}", "QAT student, format=gguf", p, kind="students", torch_ppl=ppl))
    return rows


# ---------------------------------------------------------------- the table


COLUMNS = ("row", "source", "weight types", "file MiB", "bits/weight", "WT-2 test PPL", "PyTorch PPL (vs)", "RSS MiB",
           "pp64 tok/s", "tg32 tok/s")


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.path is None:
            lines.append(f"| {r.label} | {r.source} | not built: {r.why_not} |" + " |" * (len(COLUMNS) - 3))
            continue
        t = tensor_table(r.path)
        m = r.result
        ref = "-" if r.torch_ppl is None else f"{r.torch_ppl:.2f} ({100 * (m['ppl'] / r.torch_ppl - 1):+.1f}%)"
        lines.append(f"| {r.label} | {r.source} | {type_mix(t)} | {r.path.stat().st_size / MIB:.1f} | "
                     f"{weight_bits(t):.2f} | {m['ppl']:.2f} | {ref} | {m['rss_mib']:.0f} | {m['pp_tok_s']:.0f} | "
                     f"{m['tg_tok_s']:.1f} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", help="teacher run dir (qgplm.run stage=teacher) or HF model dir")
    p.add_argument("--student", action="append", default=[], help="student run dir (repeatable)")
    p.add_argument("--shipped", help="a .gguf file of the pretrained model, as shipped (its own row)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wikitext-2"),
                   help="folder with wiki.test.tokens and wiki.train.tokens")
    p.add_argument("--tokens", type=int, default=32768, help="test tokens scored (qgplm's preset: 32768)")
    p.add_argument("--block", type=int, default=128, help="tokens per evaluation window")
    p.add_argument("--stride", type=int, default=127, help="window advance (at most block - 1)")
    p.add_argument("--imatrix-tokens", type=int, default=8192, help="training tokens for the importance matrix")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--student-2bit", default="q4_0,q2_0",
                   help="layouts of a student's 2-bit rows that are not a multiple of 256, in the order to measure")
    p.add_argument("--rows", default=",".join(ALL_ROWS),
                   help=f"comma-separated subset of {','.join(ALL_ROWS)}, in the order to measure")
    p.add_argument("--cache", default=str(ROOT / "experiments" / "results" / "llamacpp_compare"))
    p.add_argument("--rebuild", action="store_true", help="build every file again")
    p.add_argument("--json", help="also write the rows' numbers to this file")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure one file (the fresh subprocess)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    args.student_2bit = [t for t in args.student_2bit.split(",") if t]
    if not args.student_2bit or any(t not in ("q2_0", "q4_0") for t in args.student_2bit):
        raise CompareError("--student-2bit takes q2_0, q4_0 or both, comma-separated")
    bad = [r for r in args.rows if r not in ALL_ROWS]
    if bad:
        raise CompareError(f"unknown row {bad[0]!r}: choose from {', '.join(ALL_ROWS)}")
    if args.measure is None and not args.teacher:
        raise CompareError("pass --teacher <teacher run dir>")
    if args.tokens < args.block + 1 or args.threads < 1 or not 0 < args.stride < args.block:
        raise CompareError("--tokens must exceed --block, --threads be >= 1 and 0 < --stride < --block")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, np.load(args.ids), args.threads, args.block, args.stride)))
        return 0
    rows, ids_file = build_rows(args, Path(args.cache))
    for r in rows:
        if r.path is not None:
            t0 = time.time()
            r.result = measure_in_subprocess(r.path, ids_file, args.threads, args.block, args.stride)
            print(f"measured {r.label}: {json.dumps(r.result)} ({time.time() - t0:.0f} s)", file=sys.stderr)
            if args.json:  # after every row, so that a long run's finished rows are kept
                Path(args.json).write_text(json.dumps([{"label": r.label, "source": r.source, "path": str(r.path),
                                                        "why_not": r.why_not, **r.result} for r in rows], indent=1))
    print(f"WikiText-2 test, first {args.tokens} tokens, windows of {args.block} advancing by {args.stride}; "
          f"{args.threads} threads, batch 1")
    print(table(rows))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
