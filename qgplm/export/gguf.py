"""`format=gguf`: a GGUF file of a qgplm GPT-2 export that llama.cpp runs without qgplm.

    <out>/model.gguf        weights, hyper-parameters and the BPE tokenizer (GGUF v3, arch "gpt2")
    <out>/config.json, generation_config.json, tokenizer files   as in the packed export

Why llama.cpp next to onnxruntime (README "Deploying a qgplm model" has the measurements): its
TQ2_0 type stores 2-bit codes at 2.06 bits per weight (64 bytes of codes + one fp16 scale per 256
weights) and its CPU kernel computes on that layout directly, so what is resident in RAM is the
file; onnxruntime's MatMulNBits repacks 2-bit weights to about 3 bits per weight. llama.cpp has no
BART (no encoder-decoder with learned positions), so BART deploys through onnxruntime only.

Mapping of the student's codes (no re-quantization; the only rounding is the scale's fp16):
    2-bit, ternary {-1, 0, 1}:    TQ2_0, q = c + 1, d = fp16(step)     -> (q - 1) * d = c * step
    2-bit, full grid {-2..1}:     TQ2_0, q = 1 - c, d = -fp16(step)    -> (q - 1) * d = c * step
        (TQ2_0's kernel computes (q - 1) * d for any q in 0..3, so the grid's -2 is q = 3 with a
        negated scale)
    3-, 4-bit [-8, 7]:            Q4_0 (32 per block), q = c + 8, d = fp16(step)
    5- to 8-bit [-128, 127]:      Q8_0 (32 per block), q = c, d = fp16(step)
A 2-bit tensor whose rows are not a multiple of 256 long (tiny test models) is held as Q4_0, which
is still exact; rows must be a multiple of 32 long. The step is per tensor or per row, the same in
every block of a row. Dequantized, every weight equals codes * fp16(step) exactly (the product of
a small integer and an fp16 number is exact in fp32); the export report gives the largest
relative rounding of a step to fp16.

Tensors that are not quantized (position embeddings, LayerNorms, biases) are stored in fp32 (or
as exported: 8-bit position embeddings become Q8_0). The tied LM head is not written: llama.cpp's
GPT-2 reads the token embedding as its output matrix, so one copy of the table is resident.

Activations: llama.cpp quantizes each row of a layer's input to 8 bits per block (Q8_K, 256 per
block, for TQ2_0; Q8_0, 32 per block, otherwise), symmetric with its own scale, not with the
student's per-tensor min-max. Attention (scores, softmax, the KV cache) runs in llama.cpp's own
precision (fp32 / fp16 cache), so a `quantize_attention` student's attention fake quantization is
not applied. `experiments/bench_lowbit_quality.py` measures what that costs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qgplm.errors import QgplmError, optional_module
from qgplm.export.convert import via_packed_export
from qgplm.export.format import MANIFEST, WEIGHTS, empty_out_dir, read_manifest, verify_checksums
from qgplm.export.pack import row_steps

GGUF_FILE = "model.gguf"
SUPPORTED = {"GPT2LMHeadModel": "GPT-2 (GPT2LMHeadModel)"}
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GPT-2 uses the tanh GELU
MIB = 2**20


def _gguf():
    return optional_module("gguf", "format=gguf needs the gguf package: pip install gguf (make install does "
                                   "it), or use format=onnx")


def _llama_cpp():
    return optional_module("llama_cpp", "running a GGUF file needs llama-cpp-python: pip install "
                                        "llama-cpp-python (make install does it), or use mode=lowbit")


def check_supported(model_class: str, config: Any = None) -> None:
    """One line naming what llama.cpp's GPT-2 runs, for anything else."""
    if model_class not in SUPPORTED:
        raise QgplmError(f"format=gguf supports {', '.join(SUPPORTED.values())}, not {model_class} (llama.cpp has "
                         f"no such architecture here): use format=onnx (GPT-2 and BART) or mode=lowbit")
    if config is not None:
        if config.activation_function not in TANH_GELU:
            raise QgplmError(f"activation_function={config.activation_function!r}: llama.cpp's GPT-2 computes the "
                             f"tanh GELU ({', '.join(TANH_GELU)}); use format=onnx for this model")
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn",
                                                                                  False):
            raise QgplmError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not in llama.cpp's "
                             "GPT-2: use format=onnx for this model")


# ---------------------------------------------------------------- block encoders (exact)


def _rows_step(step: Tensor, n: int) -> np.ndarray:
    """fp16 [N] from a per-tensor or per-row step."""
    s = row_steps(step, n)
    if not bool(torch.isfinite(s).all()) or float(s.abs().max()) > 65504:
        raise QgplmError("a quantizer step does not fit fp16 (GGUF's block scale): use format=onnx (fp32 scales)")
    return s.numpy().astype(np.float16)


def encode_tq2_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """TQ2_0 rows: uint8 [N, K / 256 * 66] from 2-bit signed codes [N, K] (K % 256 == 0).

    Block of 256: qs[64] then d (fp16). Value v = c*128 + l*32 + m sits in bits 2l..2l+1 of byte
    c*32 + m (ggml's dequantize_row_tq2_0); it dequantizes to (q - 1) * d."""
    n, k = codes.shape
    c = codes.to(torch.int16)
    if int(c.min()) < -2 or int(c.max()) > 1:
        raise QgplmError("codes out of the 2-bit range: the export is corrupt, export it again")
    d = _rows_step(step, n)
    full_grid = int(c.min()) < -1
    q = (1 - c) if full_grid else (c + 1)
    d = -d if full_grid else d
    q = q.to(torch.uint8).numpy().reshape(n, k // 256, 2, 4, 32)
    qs = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)  # [N, B, 2, 32]
    dd = np.repeat(d.view(np.uint8).reshape(n, 1, 2), k // 256, axis=1)
    return np.concatenate([qs.reshape(n, k // 256, 64), dd], axis=-1).reshape(n, -1)


def encode_q4_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """Q4_0 rows: uint8 [N, K / 32 * 18] from codes in [-8, 7] (K % 32 == 0).

    Block of 32: d (fp16) then qs[16]; value j < 16 is the low nibble of qs[j], value j >= 16 the
    high nibble of qs[j - 16]; it dequantizes to (q - 8) * d."""
    n, k = codes.shape
    u = codes.to(torch.int16) + 8
    if int(u.min()) < 0 or int(u.max()) > 15:
        raise QgplmError("codes out of the 4-bit range: the export is corrupt, export it again")
    u = u.to(torch.uint8).numpy().reshape(n, k // 32, 2, 16)
    qs = u[:, :, 0] | (u[:, :, 1] << 4)
    dd = np.repeat(_rows_step(step, n).view(np.uint8).reshape(n, 1, 2), k // 32, axis=1)
    return np.concatenate([dd, qs], axis=-1).reshape(n, -1)


def encode_q8_0(codes: Tensor, step: Tensor) -> np.ndarray:
    """Q8_0 rows: uint8 [N, K / 32 * 34] from codes in [-128, 127]: d (fp16), then int8 qs[32]."""
    n, k = codes.shape
    if int(codes.min()) < -128 or int(codes.max()) > 127:
        raise QgplmError("codes out of the 8-bit range: the export is corrupt, export it again")
    qs = codes.to(torch.int8).numpy().reshape(n, k // 32, 32).view(np.uint8)
    dd = np.repeat(_rows_step(step, n).view(np.uint8).reshape(n, 1, 2), k // 32, axis=1)
    return np.concatenate([dd, qs], axis=-1).reshape(n, -1)


def ggml_type(bits: int, k: int, name: str) -> tuple[str, str]:
    """(GGML type name, why) that holds `bits`-bit codes of rows `k` long exactly."""
    if bits <= 2 and k % 256 == 0:
        return "TQ2_0", ""
    if k % 32:
        raise QgplmError(f"{name}: rows of {k} weights cannot be stored in GGUF's quantized blocks (a multiple of "
                         f"32 is needed, 256 for 2-bit TQ2_0): use format=onnx")
    if bits <= 2:
        return "Q4_0", f"rows of {k} are not a multiple of 256 (TQ2_0's block): held as 4-bit"
    if bits <= 4:
        return "Q4_0", "" if bits == 4 else "3-bit codes held as 4-bit"
    if bits <= 8:
        return "Q8_0", "" if bits == 8 else f"{bits}-bit codes held as 8-bit"
    raise QgplmError(f"{name}: {bits}-bit codes do not fit GGUF's quantized types (2..8 bits)")


ENCODERS = {"TQ2_0": encode_tq2_0, "Q4_0": encode_q4_0, "Q8_0": encode_q8_0}


# ---------------------------------------------------------------- GPT-2 names and metadata


def gguf_name(sd_key: str) -> str | None:
    """llama.cpp's tensor name of a GPT2LMHeadModel state-dict key (None: not written)."""
    fixed = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
    if sd_key in fixed:
        return fixed[sd_key]
    parts = sd_key.split(".")
    if len(parts) < 5 or parts[:2] != ["transformer", "h"]:
        return None
    layer, rest = parts[2], ".".join(parts[3:])
    per_layer = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    module, _, leaf = rest.rpartition(".")
    if module not in per_layer:
        return None
    return f"blk.{layer}.{per_layer[module]}.{leaf}"


def _add_hparams(writer: Any, config: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: Any, config: Any) -> None:
    """The byte-level BPE as llama.cpp's "gpt2" tokenizer; "none" (ids only) without a tokenizer."""
    vocab = config.vocab_size
    if tokenizer is None:
        writer.add_tokenizer_model("none")
        writer.add_vocab_size(vocab)
        return
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE":
        raise QgplmError(f"format=gguf writes byte-level BPE tokenizers (GPT-2's), not {state['model']['type']}")
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab):
        tok = id_to_token.get(i)
        if tok is None:  # the model's table is larger than the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        value = getattr(config, key, None)
        if value is not None and 0 <= value < vocab:
            add(value)
    writer.add_add_bos_token(False)  # GPT-2 prompts start without <|endoftext|>, as in HF


# ---------------------------------------------------------------- export


@dataclass
class GGUFReport:
    out_dir: str
    file_bytes: int
    fp32_bytes: int
    types: dict[str, str] = field(default_factory=dict)  # GGUF tensor name -> GGML type
    notes: list[str] = field(default_factory=list)
    max_step_rounding: float = 0.0  # largest |fp16(step) - step| / step over all quantized tensors

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes

    def table(self) -> str:
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        lines = [f"{'tensors':<28}{', '.join(f'{n} {t}' for t, n in sorted(counts.items()))}",
                 f"{GGUF_FILE + ' on disk':<28}{self.file_bytes / MIB:>10.2f} MiB",
                 f"{'FP32 tensors (reference)':<28}{self.fp32_bytes / MIB:>10.2f} MiB",
                 f"{'compression':<28}{self.ratio:>10.2f} x",
                 f"{'step rounding to fp16':<28}{self.max_step_rounding:>10.2e} (largest relative)"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _tensor_arrays(manifest: dict[str, Any], tensors: dict[str, Tensor],
                   report: GGUFReport) -> list[tuple[str, np.ndarray, str]]:
    """(GGUF name, array, GGML type) of every tensor llama.cpp's GPT-2 reads, each stored tensor once."""
    from qgplm.export.loader import decode

    out: list[tuple[str, np.ndarray, str]] = []
    for kind in ("packed", "fp"):
        for key, entry in manifest[kind].items():
            names = [n for n in (gguf_name(a) for a in entry["aliases"]) if n is not None]
            if not names:
                if all(a.endswith((".attn.bias", ".attn.masked_bias")) for a in entry["aliases"]):
                    continue  # GPT-2's causal-mask buffers: llama.cpp builds its own mask
                raise QgplmError(f"{key} has no place in llama.cpp's GPT-2: use format=onnx for this model")
            # tied head: stored once, as the embedding, which llama.cpp reads as its output matrix too
            name = "token_embd.weight" if "token_embd.weight" in names else names[0]
            if kind == "fp":
                out.append((name, tensors[key].float().numpy(), "F32"))
                continue
            codes, step = decode(tensors, key, entry)
            qtype, why = ggml_type(entry["bits"], codes.shape[1], key)
            if why:
                report.notes.append(f"{key}: {why}")
            s = step.reshape(-1).float()
            report.max_step_rounding = max(report.max_step_rounding, float(
                ((s.half().float() - s).abs() / s.abs().clamp_min(1e-30)).max()))
            out.append((name, ENCODERS[qtype](codes, step), qtype))
    return out


def export_gguf(source: Any, out_dir: str | Path, tokenizer: Any = None, **export_kwargs: Any) -> GGUFReport:
    """Write `<out_dir>/model.gguf` of `source`: a qgplm export directory, or a model (a trained
    student, or a float model quantized post-training with `export_kwargs` as in `export_model`),
    exported to the packed format first in a temporary directory."""
    _gguf()
    out = empty_out_dir(out_dir)
    return via_packed_export(source, tokenizer, export_kwargs, lambda m: check_supported(type(m).__name__, m.config),
                             lambda d: _from_dir(d, out), "qgplm-gguf-")


def _from_dir(export_dir: Path, out: Path) -> GGUFReport:
    gguf = _gguf()
    from transformers import AutoConfig

    from qgplm.export.loader import _read_tensors, load_export_tokenizer

    export_dir, manifest = read_manifest(export_dir)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True)
    check_supported(manifest["model_class"], config)
    verify_checksums(export_dir, manifest)
    notes = (["attention fake quantization (quantize_attention) is not applied: llama.cpp runs attention in "
              "fp32/fp16"] if manifest.get("attention_act") else [])
    report = GGUFReport(str(out), 0, manifest["size"]["fp32_bytes"], notes=notes)
    arrays = _tensor_arrays(manifest, _read_tensors(export_dir), report)
    out.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out / GGUF_FILE), "gpt2")
    writer.add_name(Path(export_dir).name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if any(t == "TQ2_0" for _, _, t in arrays)
                         else gguf.LlamaFileType.ALL_F32)
    _add_hparams(writer, config)
    _add_tokenizer(writer, gguf, load_export_tokenizer(export_dir), config)
    writer.add_string("qgplm.bits", json.dumps(manifest["bits"]))
    writer.add_string("qgplm.quantizer", ",".join(manifest["quantizer"]))
    for name, array, qtype in arrays:
        raw = None if qtype == "F32" else getattr(gguf.GGMLQuantizationType, qtype)
        writer.add_tensor(name, array, raw_dtype=raw)
        report.types[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for f in sorted(export_dir.iterdir()):  # config, generation config, tokenizer
        if f.is_file() and f.name not in (WEIGHTS, MANIFEST):
            shutil.copy2(f, out / f.name)
    report.file_bytes = (out / GGUF_FILE).stat().st_size
    return report


# ---------------------------------------------------------------- running it (llama-cpp-python)


def gguf_path(path: str | Path) -> Path:
    """The model.gguf of an export dir, or a .gguf file itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / GGUF_FILE
    if not p.is_file():
        raise QgplmError(f"{p} does not exist: write it with python -m qgplm.export ... format=gguf")
    return p


class LlamaCppLM:
    """A GGUF model on llama.cpp (through llama-cpp-python): logits of token ids and greedy decoding.

    Token ids in, token ids out (the tokenizer stays the export's HF tokenizer, so qgplm's and
    llama.cpp's runs are compared on the same ids); `n_ctx` is the longest sequence it holds."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int | None = None):
        llama_cpp = _llama_cpp()
        threads = threads or torch.get_num_threads()
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf_path(path)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, logits_all=True,
                                       verbose=False, use_mmap=True)
        except ValueError as e:
            raise QgplmError(f"llama.cpp cannot load {path} ({e}): export it again with format=gguf") from None
        self.n_ctx = n_ctx

    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: the logits after every prefix (a fresh context)."""
        if not 0 < len(ids) <= self.n_ctx:
            raise QgplmError(f"{len(ids)} tokens do not fit n_ctx={self.n_ctx}: pass 1..{self.n_ctx} tokens")
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """The greedy continuation of `ids` (KV-cached: one token per step after the prompt)."""
        if len(ids) + max_new_tokens > self.n_ctx:
            raise QgplmError(f"{len(ids)} + {max_new_tokens} tokens do not fit n_ctx={self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        new: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(nxt)
            if nxt == eos_token_id:
                break
            self.llm.eval([nxt])
        return new

    def close(self) -> None:
        self.llm.close()


class LlamaCppCausalLM(torch.nn.Module):
    """A GGUF model behind the interface of a HF causal LM forward, for qgplm's evaluation code
    (perplexity, `experiments/bench_lowbit_quality.py`): `forward(input_ids, attention_mask)`
    returns an object with `.logits` [batch, seq, vocab]. Rows run one at a time on llama.cpp;
    right padding is skipped (its logits are 0: qgplm's losses ignore padded labels), left padding
    is refused (llama.cpp's positions would differ from HF's)."""

    def __init__(self, path: str | Path, config: Any, n_ctx: int | None = None, threads: int | None = None):
        super().__init__()
        self.config = config
        self.lm = LlamaCppLM(path, n_ctx=n_ctx or config.n_positions, threads=threads)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Any:
        from types import SimpleNamespace

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        out = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for i, (row, m) in enumerate(zip(input_ids.tolist(), mask.bool(), strict=True)):
            n = int(m.sum())
            if not bool(m[:n].all()):
                raise QgplmError("llama.cpp rows must be right-padded (or unpadded): left padding shifts positions")
            if n:
                out[i, :n] = torch.from_numpy(self.lm.logits(row[:n]))
        return SimpleNamespace(logits=out, loss=None, hidden_states=None)


__all__ = ["GGUF_FILE", "GGUFReport", "LlamaCppCausalLM", "LlamaCppLM", "SUPPORTED", "check_supported",
           "encode_q4_0", "encode_q8_0", "encode_tq2_0", "export_gguf", "ggml_type", "gguf_name", "gguf_path"]
