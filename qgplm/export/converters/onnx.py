"""`format=onnx`: a standalone ONNX model of a qgplm export that onnxruntime runs without qgplm.

    <out>/model.onnx        the graph (opset 18 + com.microsoft MatMulNBits), small constants inline
    <out>/model_with_past.onnx   GPT-2 only: the same model with a KV cache, same weights file
    <out>/model.onnx.data   every weight (onnx external data, one file)
    <out>/config.json, generation_config.json, tokenizer files   as in the packed export

Graphs (dynamic batch and sequence axes):
    GPT-2 (GPT2LMHeadModel):            input_ids, attention_mask [batch, seq] int64 -> logits
      with past: input_ids [batch, new], attention_mask [batch, past + new],
                 past_key_values.<i>.key/.value [batch, heads, past, head_dim] (past may be 0)
                 -> logits, present.<i>.key/.value [batch, heads, past + new, head_dim]
    BART (BartForConditionalGeneration): input_ids, attention_mask [batch, src] int64,
                                         decoder_input_ids [batch, tgt] int64 -> logits
                                         (no KV cache: every call runs encoder and decoder)
Position ids are past..past+new-1 (as the HF forward without position_ids), so left-padded GPT-2
batches get the positions HF's forward gives them, not those of HF's generate.

The graph is the lowbit mode's model (lowbit.py), written op by op with onnx.helper (the
TorchScript exporter bakes HF's mask and position logic into constants):
- every quantized linear layer, and the tied LM head, is one `com.microsoft.MatMulNBits` node whose
  B and scales are the student's codes exactly (`pack_rows` / `block_scales`: unsigned code =
  code + 2^(b-1) with the default zero point, the step as each block's fp32 scale; 3-bit held as
  4-bit), plus its bias;
- a quantized token embedding gathers rows of that same packed B (one initializer shared with
  the tied LM head), unpacks them with BitShift / BitwiseAnd and computes (u - zp) * step, the
  float product of lowbit mode, so the file stays ~2 bits per weight;
- layers whose weight is not quantized keep FP32 weights and the student's 8-bit input
  quantizer (per-tensor min-max, as in lowbit mode); `quantize_attention` students get the same
  fake quantization of queries, keys, probabilities and values.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgplm.errors import QgplmError, optional_module
from qgplm.export.converters.via_packed import via_packed_export
from qgplm.export.format.manifest import MANIFEST, WEIGHTS, empty_out_dir, read_manifest, verify_checksums
from qgplm.export.format.report import ExportReport
from qgplm.export.runtimes.lowbit import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK, block_scales, kernel_bits, pack_rows

ONNX_FILE = "model.onnx"
PAST_FILE = "model_with_past.onnx"  # GPT-2 only: the KV-cache graph, sharing model.onnx.data
DATA_FILE = "model.onnx.data"
OPSET = 18
IR_VERSION = 10  # onnxruntime >= 1.20 reads it
SUPPORTED = {"GPT2LMHeadModel": "GPT-2 (GPT2LMHeadModel)",
             "BartForConditionalGeneration": "BART (BartForConditionalGeneration)"}


def _onnx():
    return optional_module("onnx", "format=onnx")


def check_supported(model_class: str) -> None:
    """One line naming what format=onnx supports, for any other architecture."""
    if model_class not in SUPPORTED:
        raise QgplmError(f"format=onnx does not support {model_class}: supported are "
                         f"{' and '.join(SUPPORTED.values())}; use the default format (qgplm) with mode=lowbit")


class _Graph:
    """Nodes and initializers of one model, with the export's tensors looked up by state-dict key."""

    def __init__(self, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], block_size: int,
                 accuracy_level: int, packed_arrays: dict[str, tuple] | None = None):
        from onnx import helper, numpy_helper

        from qgplm.export.loader import decode

        self.helper, self.numpy_helper = helper, numpy_helper
        self.manifest, self.tensors = manifest, tensors
        self.block_size, self.accuracy_level = block_size, accuracy_level
        self.decode = decode
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self.where: dict[str, tuple[str, str]] = {}  # state-dict key -> ("packed"|"fp", stored key)
        for kind in ("packed", "fp"):
            for key, entry in manifest[kind].items():
                for alias in entry["aliases"]:
                    self.where[alias] = (kind, key)
        self.quantized = {name: e["weight"] for name, e in manifest["modules"].items() if e["weight"] is not None}
        self.act = {name: e["act"] for name, e in manifest["modules"].items() if e["act"] is not None}
        self.attention_act = manifest.get("attention_act")
        self._packed: dict[str, dict[str, Any]] = {}
        # key -> (B, scales, n, k, bits, blocks, step): shared by the graphs of one export, so the
        # KV-cache graph does not decode and repack every weight again
        self._arrays = {} if packed_arrays is None else packed_arrays
        self._fp: dict[tuple[str, bool], str] = {}
        self._count = 0

    # ------------------------------------------------------------ primitives

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           domain: str | None = None, **attrs) -> Any:
        hint = hint or op_type
        outs = [self.fresh(hint) for _ in range(outputs)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=self.fresh(f"{hint}/{op_type}"),
                                                **kw, **attrs))
        return outs[0] if outputs == 1 else outs

    def init(self, name: str, array: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = self.numpy_helper.from_array(np.ascontiguousarray(array), name)
        return name

    def const(self, value: Any, dtype: Any) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.init(f"const_{arr.dtype}_{'x'.join(map(str, arr.shape))}_{arr.tobytes().hex()}", arr)

    # ------------------------------------------------------------ the export's tensors

    def has(self, sd_key: str) -> bool:
        return sd_key in self.where

    def fp(self, sd_key: str, transpose: bool = False) -> str:
        """A float32 initializer of a state-dict tensor (a packed one dequantized as codes * step)."""
        kind, key = self.where[sd_key]
        if (key, transpose) in self._fp:
            return self._fp[(key, transpose)]
        if kind == "packed":
            from qgplm.export.loader import dequantize

            entry = self.manifest["packed"][key]
            codes, step = self.decode(self.tensors, key, entry)
            t = dequantize(codes, step)
            if entry["transposed"]:
                t = t.t()
        else:
            t = self.tensors[key].float()
        arr = t.detach().float().numpy()
        arr = arr.T if transpose else arr
        name = self.init(key + (".T" if transpose else ""), arr)
        self._fp[(key, transpose)] = name
        return name

    def packed(self, key: str) -> dict[str, Any]:
        """MatMulNBits' B [N, blocks, block_size * bits / 8] and scales [N * blocks] of a packed tensor."""
        if key not in self._arrays:
            entry = self.manifest["packed"][key]
            codes, step = self.decode(self.tensors, key, entry)
            n, k = codes.shape
            bits = kernel_bits(entry["bits"])
            blocks = -(-k // self.block_size)
            self._arrays[key] = (pack_rows(codes, bits, self.block_size), block_scales(step, n, blocks),
                                 n, k, bits, blocks, step.float().numpy().reshape(-1))
        if key not in self._packed:
            b, s, n, k, bits, blocks, step = self._arrays[key]
            self._packed[key] = {"B": self.init(f"{key}.B", b), "scales": self.init(f"{key}.scales", s),
                                 "n": n, "k": k, "bits": bits, "blocks": blocks, "step": step}
        return self._packed[key]

    # ------------------------------------------------------------ layers

    def fake_quant(self, x: str, spec: dict[str, Any], axis: int = -1) -> str:
        """functional.minmax_activation_quantize in eval, x + (xq - x), for the manifest's rule `spec`:
        one dynamic min-max range per tensor, or per token (`granularity: token`) along `axis`, the
        dimension a token's values lie on (-1, or -2 for keys stored transposed)."""
        bits, symmetric = spec["bits"], spec["symmetric"]
        per_token = spec.get("granularity", "tensor") == "token"

        def reduce(op: str, t: str) -> str:
            if per_token:
                return self.op(op, [t, self.const([axis], np.int64)], keepdims=1)
            return self.op(op, [t], keepdims=0)

        eps = self.const(1e-8, np.float32)
        if symmetric:
            n = 2 ** (bits - 1) - 1
            step = self.op("Max", [self.op("Div", [reduce("ReduceMax", self.op("Abs", [x])),
                                                   self.const(n, np.float32)]), eps])
            q = self.op("Clip", [self.op("Round", [self.op("Div", [x, step])]), self.const(-n, np.float32),
                                 self.const(n, np.float32)])
            xq = self.op("Mul", [q, step])
        else:
            qmax = 2**bits - 1
            lo = reduce("ReduceMin", x)
            hi = reduce("ReduceMax", x)
            step = self.op("Max", [self.op("Div", [self.op("Sub", [hi, lo]), self.const(qmax, np.float32)]), eps])
            zero = self.op("Round", [self.op("Div", [self.op("Neg", [lo]), step])])
            q = self.op("Clip", [self.op("Add", [self.op("Round", [self.op("Div", [x, step])]), zero]),
                                 self.const(0, np.float32), self.const(qmax, np.float32)])
            xq = self.op("Mul", [self.op("Sub", [q, zero]), step])
        return self.op("Add", [x, self.op("Sub", [xq, x])])

    def linear(self, x: str, name: str, conv1d: bool = False) -> str:
        """y = x W^T + b of the module `name` (nn.Linear, or Conv1D whose weight is stored [in, out])."""
        if name in self.quantized:
            p = self.packed(self.quantized[name])
            y = self.op("MatMulNBits", [x, p["B"], p["scales"]], hint=name, domain="com.microsoft",
                        K=p["k"], N=p["n"], bits=p["bits"], block_size=self.block_size,
                        accuracy_level=self.accuracy_level)
            self.nodes[-1].name = name  # MatMulNBits nodes are named after their module
        else:
            if name in self.act:
                x = self.fake_quant(x, self.act[name])
            y = self.op("MatMul", [x, self.fp(f"{name}.weight", transpose=not conv1d)], hint=name)
        if self.has(f"{name}.bias"):
            y = self.op("Add", [y, self.fp(f"{name}.bias")], hint=name)
        return y

    def embedding(self, ids: str, name: str, embed_scale: float | None = None, rank: int = 2) -> str:
        """Rows of the table `name`.weight for ids of `rank` dims: a packed one is gathered packed and unpacked."""
        sd_key = f"{name}.weight"
        kind, key = self.where[sd_key]
        if kind != "packed":
            out = self.op("Gather", [self.fp(sd_key), ids], hint=name)
        else:
            p = self.packed(key)
            bits, per = p["bits"], 8 // p["bits"]
            rows = self.op("Gather", [p["B"], ids], hint=name)  # [..., blocks, block_size / per] uint8
            rows = self.op("Unsqueeze", [rows, self.const([-1], np.int64)], hint=name)
            u = self.op("BitShift", [rows, self.const(np.arange(per) * bits, np.uint8)], hint=name,
                        direction="RIGHT")
            if bits < 8:
                u = self.op("BitwiseAnd", [u, self.const(2**bits - 1, np.uint8)], hint=name)
            u = self.op("Reshape", [u, self.const([0] * rank + [-1], np.int64)], hint=name)
            u = self.op("Slice", [u, self.const([0], np.int64), self.const([p["k"]], np.int64),
                                  self.const([-1], np.int64)], hint=name)
            f = self.op("Sub", [self.op("Cast", [u], hint=name, to=1), self.const(2 ** (bits - 1), np.float32)],
                        hint=name)
            if p["step"].size == 1:
                step = self.const(p["step"][0], np.float32)
            else:  # per-row step: every block of a row has it; take the row's first block
                idx = self.op("Mul", [ids, self.const(p["blocks"], np.int64)], hint=name)
                step = self.op("Unsqueeze", [self.op("Gather", [p["scales"], idx], hint=name),
                                             self.const([-1], np.int64)], hint=name)
            out = self.op("Mul", [f, step], hint=name)
        if embed_scale is not None:
            out = self.op("Mul", [out, self.const(embed_scale, np.float32)], hint=name)
        return out

    def layer_norm(self, x: str, name: str, eps: float) -> str:
        return self.op("LayerNormalization", [x, self.fp(f"{name}.weight"), self.fp(f"{name}.bias")], hint=name,
                       axis=-1, epsilon=float(eps))

    def activation(self, x: str, fn: str, hint: str) -> str:
        if fn in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), transformers' NewGELUActivation
            cube = self.op("Mul", [self.op("Pow", [x, self.const(3.0, np.float32)], hint=hint),
                                   self.const(0.044715, np.float32)], hint=hint)
            inner = self.op("Mul", [self.op("Add", [x, cube], hint=hint),
                                    self.const(math.sqrt(2.0 / math.pi), np.float32)], hint=hint)
            t = self.op("Add", [self.const(1.0, np.float32), self.op("Tanh", [inner], hint=hint)], hint=hint)
            return self.op("Mul", [self.op("Mul", [self.const(0.5, np.float32), x], hint=hint), t], hint=hint)
        if fn == "gelu":
            e = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0), np.float32)], hint=hint)], hint=hint)
            t = self.op("Add", [e, self.const(1.0, np.float32)], hint=hint)
            return self.op("Mul", [self.op("Mul", [x, self.const(0.5, np.float32)], hint=hint), t], hint=hint)
        if fn == "relu":
            return self.op("Relu", [x], hint=hint)
        raise QgplmError(f"format=onnx does not support activation_function={fn!r}: supported are gelu, gelu_new, "
                         f"relu")

    def heads(self, x: str, heads: int, head_dim: int, perm: list[int], hint: str) -> str:
        """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim] (perm 0,2,1,3) or its key form."""
        x = self.op("Reshape", [x, self.const([0, 0, heads, head_dim], np.int64)], hint=hint)
        return self.op("Transpose", [x], hint=hint, perm=perm)

    def attention(self, q: str, k: str, v: str, mask: str | None, heads: int, head_dim: int, scaling: float,
                  hint: str, past: tuple[str, str] | None = None) -> Any:
        """softmax(q k^T * scaling + mask) v over [batch, seq, dim] inputs; out [batch, seq, dim].
        With `past` (key, value [batch, heads, past, head_dim]) the new keys and values are appended
        and (out, (key, value)) returned: the present cache."""
        quant = self.attention_act
        qh = self.heads(q, heads, head_dim, [0, 2, 1, 3], hint)
        if past is None:
            kh = self.heads(k, heads, head_dim, [0, 2, 3, 1], hint)
            vh = self.heads(v, heads, head_dim, [0, 2, 1, 3], hint)
        else:
            kfull = self.op("Concat", [past[0], self.heads(k, heads, head_dim, [0, 2, 1, 3], hint)], hint=hint, axis=2)
            vh = self.op("Concat", [past[1], self.heads(v, heads, head_dim, [0, 2, 1, 3], hint)], hint=hint, axis=2)
            present = (kfull, vh)
            kh = self.op("Transpose", [kfull], hint=hint, perm=[0, 1, 3, 2])
        if quant:
            qh = self.fake_quant(qh, quant)
            kh = self.fake_quant(kh, quant, axis=-2)  # keys are [batch, heads, head_dim, seq] here
        scores = self.op("Mul", [self.op("MatMul", [qh, kh], hint=hint), self.const(scaling, np.float32)], hint=hint)
        if mask is not None:
            scores = self.op("Add", [scores, mask], hint=hint)
        probs = self.op("Softmax", [scores], hint=hint, axis=-1)
        if quant:
            probs = self.fake_quant(probs, quant)
            vh = self.fake_quant(vh, quant)
        out = self.op("Transpose", [self.op("MatMul", [probs, vh], hint=hint)], hint=hint, perm=[0, 2, 1, 3])
        out = self.op("Reshape", [out, self.const([0, 0, heads * head_dim], np.int64)], hint=hint)
        return out if past is None else (out, present)

    # ------------------------------------------------------------ masks and positions

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 scalar."""
        return self.op("Squeeze", [self.op("Shape", [x], start=axis, end=axis + 1)])

    def seq_range(self, ids: str, offset: int | str = 0) -> str:
        """0..seq-1 (+ offset: an int, or an int64 scalar of the graph) as int64 [seq] for ids [batch, seq]."""
        r = self.op("Range", [self.const(0, np.int64), self.dim(ids, 1), self.const(1, np.int64)])
        if isinstance(offset, str):
            return self.op("Add", [r, offset])
        return self.op("Add", [r, self.const(offset, np.int64)]) if offset else r

    def bias_of(self, allowed: str) -> str:
        """0 where attention is allowed, the float32 minimum elsewhere (HF's additive masks)."""
        return self.op("Where", [allowed, self.const(0.0, np.float32),
                                 self.const(np.finfo(np.float32).min, np.float32)])

    def causal(self, positions: str, key_positions: str | None = None) -> str:
        """bool [seq, keys]: key j visible from query i iff key position j <= query position i."""
        keys = positions if key_positions is None else key_positions
        return self.op("LessOrEqual", [self.op("Unsqueeze", [keys, self.const([0], np.int64)]),
                                       self.op("Unsqueeze", [positions, self.const([1], np.int64)])])

    def padding(self, attention_mask: str) -> str:
        """bool [batch, 1, 1, seq] from a 0/1 mask."""
        return self.op("Unsqueeze", [self.op("Cast", [attention_mask], to=9), self.const([1, 2], np.int64)])


def _gpt2(g: _Graph, config: Any, kv_cache: bool = False) -> tuple[list, list]:
    """kv_cache: inputs also past_key_values.<i>.key / .value [batch, heads, past, head_dim] (past may
    be 0: the prompt), attention_mask covers past + new tokens; outputs also present.<i>.key / .value."""
    from onnx import TensorProto, helper

    d, heads = config.n_embd, config.n_head
    hd = d // heads
    eps = config.layer_norm_epsilon
    past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(config.n_layer)]
    h = g.embedding("input_ids", "transformer.wte")
    if kv_cache:
        pos = g.seq_range("input_ids", offset=g.dim(past_names[0][0], 2))
        keys = g.op("Range", [g.const(0, np.int64), g.dim("attention_mask", 1), g.const(1, np.int64)])
        causal = g.causal(pos, keys)
    else:
        pos = g.seq_range("input_ids")
        causal = g.causal(pos)
    h = g.op("Add", [h, g.embedding(pos, "transformer.wpe", rank=1)], hint="transformer.wpe")
    mask = g.bias_of(g.op("And", [causal, g.padding("attention_mask")]))
    presents = []
    for i in range(config.n_layer):
        p = f"transformer.h.{i}"
        x = g.layer_norm(h, f"{p}.ln_1", eps)
        qkv = g.linear(x, f"{p}.attn.c_attn", conv1d=True)
        q, k, v = g.op("Split", [qkv], hint=f"{p}.attn", outputs=3, axis=-1, num_outputs=3)
        scaling = hd**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scaling /= float(i + 1)
        if kv_cache:
            a, present = g.attention(q, k, v, mask, heads, hd, scaling, f"{p}.attn", past=past_names[i])
            for src, dst in zip(present, (f"present.{i}.key", f"present.{i}.value"), strict=True):
                g.nodes.append(helper.make_node("Identity", [src], [dst], name=dst))
            presents += [f"present.{i}.key", f"present.{i}.value"]
        else:
            a = g.attention(q, k, v, mask, heads, hd, scaling, f"{p}.attn")
        h = g.op("Add", [h, g.linear(a, f"{p}.attn.c_proj", conv1d=True)], hint=p)
        x = g.layer_norm(h, f"{p}.ln_2", eps)
        x = g.activation(g.linear(x, f"{p}.mlp.c_fc", conv1d=True), config.activation_function, f"{p}.mlp")
        h = g.op("Add", [h, g.linear(x, f"{p}.mlp.c_proj", conv1d=True)], hint=p)
    h = g.layer_norm(h, "transformer.ln_f", eps)
    g.nodes.append(helper.make_node("Identity", [g.linear(h, "lm_head")], ["logits"], name="logits"))
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                         ["batch", "past_sequence + sequence" if kv_cache else "sequence"])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size])]
    for pair in past_names if kv_cache else []:
        ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", heads, "past_sequence", hd])
                for n in pair]
    out += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", heads, "past_sequence + sequence", hd])
            for n in presents]
    return ins, out


def _bart_attention(g: _Graph, x: str, kv: str, mask: str | None, name: str, heads: int, hd: int) -> str:
    q = g.linear(x, f"{name}.q_proj")
    k = g.linear(kv, f"{name}.k_proj")
    v = g.linear(kv, f"{name}.v_proj")
    return g.linear(g.attention(q, k, v, mask, heads, hd, hd**-0.5, name), f"{name}.out_proj")


def _bart(g: _Graph, config: Any) -> tuple[list, list]:
    from onnx import TensorProto, helper

    d = config.d_model
    scale = math.sqrt(d) if config.scale_embedding else 1.0
    act = config.activation_function
    eps = 1e-5  # nn.LayerNorm's default, as BART's layers use
    enc_pad = g.bias_of(g.padding("attention_mask"))  # [batch, 1, 1, src]

    def embed(ids: str, side: str) -> str:
        # BartScaledWordEmbedding / QuantEmbedding multiply by embed_scale (1.0 without scale_embedding)
        h = g.embedding(ids, f"model.{side}.embed_tokens", scale)
        pos = g.embedding(g.seq_range(ids, offset=2), f"model.{side}.embed_positions", rank=1)
        return g.layer_norm(g.op("Add", [h, pos], hint=f"model.{side}"), f"model.{side}.layernorm_embedding", eps)

    heads, hd = config.encoder_attention_heads, d // config.encoder_attention_heads
    h = embed("input_ids", "encoder")
    for i in range(config.encoder_layers):
        p = f"model.encoder.layers.{i}"
        h = g.layer_norm(g.op("Add", [h, _bart_attention(g, h, h, enc_pad, f"{p}.self_attn", heads, hd)]),
                         f"{p}.self_attn_layer_norm", eps)
        x = g.activation(g.linear(h, f"{p}.fc1"), act, p)
        h = g.layer_norm(g.op("Add", [h, g.linear(x, f"{p}.fc2")]), f"{p}.final_layer_norm", eps)
    enc = h

    heads, hd = config.decoder_attention_heads, d // config.decoder_attention_heads
    h = embed("decoder_input_ids", "decoder")
    causal = g.bias_of(g.causal(g.seq_range("decoder_input_ids")))  # [tgt, tgt], broadcast over batch, heads
    for i in range(config.decoder_layers):
        p = f"model.decoder.layers.{i}"
        h = g.layer_norm(g.op("Add", [h, _bart_attention(g, h, h, causal, f"{p}.self_attn", heads, hd)]),
                         f"{p}.self_attn_layer_norm", eps)
        h = g.layer_norm(g.op("Add", [h, _bart_attention(g, h, enc, enc_pad, f"{p}.encoder_attn", heads, hd)]),
                         f"{p}.encoder_attn_layer_norm", eps)
        x = g.activation(g.linear(h, f"{p}.fc1"), act, p)
        h = g.layer_norm(g.op("Add", [h, g.linear(x, f"{p}.fc2")]), f"{p}.final_layer_norm", eps)
    logits = g.linear(h, "lm_head")
    if g.has("final_logits_bias"):
        logits = g.op("Add", [logits, g.fp("final_logits_bias")], hint="final_logits_bias")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "source"]),
           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "source"]),
           helper.make_tensor_value_info("decoder_input_ids", TensorProto.INT64, ["batch", "target"])]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "target", config.vocab_size])]
    return ins, out


BUILDERS = {"GPT2LMHeadModel": _gpt2, "BartForConditionalGeneration": _bart}
KV_CACHE = ("GPT2LMHeadModel",)


def export_onnx(source: Any, out_dir: str | Path, tokenizer: Any = None, *, block_size: int = DEFAULT_BLOCK,
                accuracy_level: int = DEFAULT_ACCURACY_LEVEL, **export_kwargs: Any) -> ExportReport:
    """Write a standalone ONNX model of `source`: a qgplm export directory, or a model (a trained
    student, or a float model quantized post-training with `export_kwargs` as in `export_model`),
    exported to the packed format first in a temporary directory."""
    _onnx()
    out = empty_out_dir(out_dir)
    if block_size < 16 or block_size & (block_size - 1):
        raise QgplmError(f"block_size={block_size} is not valid: use a power of 2 >= 16 (64 is the fast default)")
    return via_packed_export(source, tokenizer, export_kwargs, lambda m: check_supported(type(m).__name__),
                             lambda d: _from_dir(d, out, block_size, accuracy_level), "qgplm-onnx-")


def _from_dir(export_dir: Path, out: Path, block_size: int, accuracy_level: int) -> ExportReport:
    onnx = _onnx()
    from onnx import helper
    from transformers import AutoConfig

    from qgplm.export.loader import read_tensors

    export_dir, manifest = read_manifest(export_dir)
    check_supported(manifest["model_class"])
    verify_checksums(export_dir, manifest)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True, trust_remote_code=False)
    tensors = read_tensors(export_dir)
    meta = {"model_class": manifest["model_class"], "bits": json.dumps(manifest["bits"]),
            "quantizer": ",".join(manifest["quantizer"]), "block_size": str(block_size),
            "accuracy_level": str(accuracy_level)}

    packed_arrays: dict[str, tuple] = {}

    def build(kv_cache: bool) -> Any:
        g = _Graph(manifest, tensors, block_size, accuracy_level, packed_arrays)
        kw = {"kv_cache": True} if kv_cache else {}
        inputs, outputs = BUILDERS[manifest["model_class"]](g, config, **kw)
        graph = helper.make_graph(g.nodes, manifest["model_class"], inputs, outputs, list(g.inits.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="qgplm", ir_version=IR_VERSION)
        helper.set_model_props(model, {**meta, "kv_cache": "past_key_values" if kv_cache else "none"})
        return model

    out.mkdir(parents=True, exist_ok=True)
    onnx.save_model(build(False), str(out / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    if manifest["model_class"] in KV_CACHE:
        # the same weights: its initializers point into model.onnx.data (names are the same)
        saved = {t.name: t for t in onnx.load(str(out / ONNX_FILE), load_external_data=False).graph.initializer}
        past = build(True)
        inits = [saved.get(t.name, t) for t in past.graph.initializer]
        del past.graph.initializer[:]
        past.graph.initializer.extend(inits)
        onnx.save_model(past, str(out / PAST_FILE))
    for f in sorted(export_dir.iterdir()):  # config, generation config, tokenizer
        if f.is_file() and f.name not in (WEIGHTS, MANIFEST):
            shutil.copy2(f, out / f.name)
    data = out / DATA_FILE
    if data.exists():
        data.chmod(0o644)  # onnx writes it owner-only; it is as public as model.onnx
    files = {f: (out / f).stat().st_size for f in (ONNX_FILE, PAST_FILE, DATA_FILE) if (out / f).exists()}
    # the MatMulNBits B and scales of every packed tensor the graphs read (3-bit codes held as 4-bit)
    quant = [(n * k, b.nbytes + s.nbytes) for b, s, n, k, *_ in packed_arrays.values()]
    weights = sum(math.prod(e["shape"]) for e in manifest["packed"].values())
    weights += sum(tensors[key].numel() for key in manifest["fp"])
    return ExportReport(str(out), "onnx", files, manifest["size"]["fp32_bytes"], weights=weights,
                        quant_weights=sum(w for w, _ in quant), quant_bytes=sum(b for _, b in quant))


__all__ = ["DATA_FILE", "ONNX_FILE", "PAST_FILE", "SUPPORTED", "check_supported", "export_onnx"]
