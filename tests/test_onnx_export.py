"""format=onnx (qgplm/export/converters/onnx.py): standalone ONNX graphs of GPT-2 and BART students.

The weights in the file are the student's codes exactly; onnxruntime alone (a subprocess that
imports neither torch nor qgplm) reproduces lowbit mode's logits and greedy generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

from qgplm.errors import QgplmError  # noqa: E402
from qgplm.export import export_model, load_quantized  # noqa: E402
from qgplm.export.converters.onnx import DATA_FILE, ONNX_FILE, PAST_FILE, export_onnx  # noqa: E402
from qgplm.export.runtimes.lowbit import kernel_bits, unpack_rows  # noqa: E402
from qgplm.quant import QuantConfig, initialize_quantizers, quantize_model, quantized_modules  # noqa: E402
from qgplm.quant.api import oriented_weight  # noqa: E402
from qgplm.quant.modules import QuantEmbedding  # noqa: E402
from tests.conftest import SHARED_DATA  # noqa: E402
from tests.test_export import IDS, VOCAB, _py, logits, student, tiny_gpt2  # noqa: E402

# Runs a session with onnxruntime and numpy only: logits of a feed, or a greedy GPT-2 loop.
RUNNER = r'''
import sys, numpy as np, onnxruntime as ort
model, job, src, dst = sys.argv[1:5]
sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
feed = dict(np.load(src))
if job == "logits":
    out = {"logits": sess.run(["logits"], feed)[0]}
else:  # greedy: append the argmax token until max_new or eos (a graph with past_key_values inputs: fed its cache)
    ids, (max_new, eos) = feed["input_ids"], feed["greedy"].tolist()
    past = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    new = ids
    for _ in range(max_new):
        res = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"input_ids": new, "attention_mask": np.ones_like(ids), **past})))
        nxt = res["logits"][:, -1].argmax(-1).astype(np.int64)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
        if past:
            past = {k.replace("present.", "past_key_values."): v for k, v in res.items() if k.startswith("present.")}
            new = nxt[:, None]
        else:
            new = ids
        if nxt[0] == eos:
            break
    out = {"ids": ids}
np.savez(dst, **out)
assert "torch" not in sys.modules and "qgplm" not in sys.modules, "the runtime side imported torch/qgplm"
print("inputs:", [i.name for i in sess.get_inputs()], "outputs:", [o.name for o in sess.get_outputs()])
'''


def ort_run(tmp_path, model_dir, job: str, graph: str = ONNX_FILE, **feed: np.ndarray) -> dict[str, np.ndarray]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, **feed)
    # -I: isolated mode (no PYTHONPATH, no cwd on sys.path), run from the model's folder
    proc = subprocess.run([sys.executable, "-I", str(script), str(model_dir / graph), job, str(src), str(dst)],
                          cwd=model_dir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(dst))


def onnx_export(tmp_path, s, name: str = "o"):
    export_model(s, tmp_path / f"{name}_packed")
    report = export_onnx(tmp_path / f"{name}_packed", tmp_path / name)
    return tmp_path / f"{name}_packed", tmp_path / name, report


def feed_of(arch: str, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    if arch == "bart":
        feed["decoder_input_ids"] = ids[:, :9].numpy()
    return feed


# ---------------------------------------------------------------- the file holds the student's codes


def _initializers(path) -> dict[str, np.ndarray]:
    m = onnx.load(str(path))  # external data loaded from model.onnx.data
    return m, {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("arch, bits, kw", [
    ("gpt2", 2, {}), ("bart", 2, {}), ("gpt2", 2, {"quantizer_kwargs": {"grid": "full"}}), ("gpt2", 4, {}),
    ("bart", 3, {"per_row": True}),
])
def test_matmulnbits_initializers_are_the_student_codes(tmp_path, arch, bits, kw):
    s = student(arch, bits, **kw)
    _, out, _ = onnx_export(tmp_path, s)
    graphs = [ONNX_FILE, PAST_FILE] if arch == "gpt2" else [ONNX_FILE]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".onnx", ".data")) == sorted([*graphs, DATA_FILE])
    model, inits = _initializers(out / ONNX_FILE)
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    attrs = {name: {a.name: a.i for a in n.attribute} for name, n in nodes.items()}
    checked = 0
    for name, mod in quantized_modules(s):
        with torch.no_grad():
            expected = mod.weight_quantizer(oriented_weight(mod))
        if isinstance(mod, QuantEmbedding):
            continue  # checked through the LM head that shares its initializer, below
        a = attrs[name]
        assert a["bits"] == kernel_bits(bits) and (a["N"], a["K"]) == tuple(expected.shape)
        b, scales = (inits[i] for i in nodes[name].input[1:])
        n, k = expected.shape
        blocks = -(-k // a["block_size"])
        assert b.dtype == np.uint8 and b.shape == (n, blocks, a["block_size"] * a["bits"] // 8)
        codes = unpack_rows(b.reshape(n, -1).copy(), a["bits"], k)
        step = torch.from_numpy(scales.copy()).view(n, blocks).repeat_interleave(a["block_size"], 1)[:, :k]
        assert torch.equal(codes.float() * step, expected), name
        checked += 1
    assert checked == len(nodes)  # every MatMulNBits node is a quantized layer of the student
    assert "lm_head" in nodes  # the tied head runs on the kernel too
    # the token embedding gathers the same packed table as the LM head: one copy in the file
    head_b = nodes["lm_head"].input[1]
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == head_b]
    assert len(gathers) == (1 if arch == "gpt2" else 2)  # BART: encoder and decoder embed_tokens
    assert not [t for t in inits.values() if t.dtype == np.float32 and t.size >= VOCAB * 32]  # no FP table
    assert {n.op_type for n in model.graph.node} >= {"BitShift", "Gather", "MatMulNBits"}
    if arch == "gpt2":  # the KV-cache graph references the same weights file, adds none of its own
        def external(path):
            m = onnx.load(str(path), load_external_data=False)
            return {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer if t.external_data}

        assert external(out / PAST_FILE) == external(out / ONNX_FILE)  # same names, offsets, one data file
        assert external(out / PAST_FILE)[head_b]["location"] == DATA_FILE


# ---------------------------------------------------------------- onnxruntime alone reproduces the student


@pytest.mark.parametrize("arch, bits", [("gpt2", 2), ("bart", 2), ("gpt2", 3)])
def test_onnxruntime_logits_match_lowbit_mode_and_student(tmp_path, arch, bits):
    s = student(arch, bits)
    packed, out, _ = onnx_export(tmp_path, s)
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0  # left padding in the first row
    got = ort_run(tmp_path, out, "logits", **feed_of(arch, IDS, mask))["logits"]
    kw = {"decoder_input_ids": IDS[:, :9]} if arch == "bart" else {}
    with torch.no_grad():
        lowbit = load_quantized(packed, mode="lowbit")(input_ids=IDS, attention_mask=mask, **kw).logits.numpy()
    fq = logits(s, arch, IDS).numpy()
    scale = np.abs(fq).max()
    valid = slice(None) if arch == "bart" else slice(4, None)  # GPT-2's padded queries are not compared
    # same kernel, same codes: lowbit mode and the file agree to float rounding
    np.testing.assert_allclose(got[0, valid], lowbit[0, valid], atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(got[1], lowbit[1], atol=1e-4 * scale, rtol=0)
    # the student (per-tensor 8-bit activations) vs the kernel's per-block int8 activations, unpadded
    got_unpadded = ort_run(tmp_path, out, "logits", **feed_of(arch, IDS, torch.ones_like(IDS)))["logits"]
    np.testing.assert_allclose(got_unpadded, fq, atol=2e-2 * scale, rtol=0)


def test_onnxruntime_greedy_generation_matches_lowbit_mode(tmp_path):
    s = student("gpt2", 2)
    packed, out, _ = onnx_export(tmp_path, s)
    prompt = IDS[:1, :6]
    new = 6
    ref = load_quantized(packed, mode="lowbit").generate(prompt, attention_mask=torch.ones_like(prompt),
                                                          max_new_tokens=new, do_sample=False, pad_token_id=0)
    job = {"input_ids": prompt.numpy(), "greedy": np.array([new, s.config.eos_token_id])}
    got = ort_run(tmp_path, out, "greedy", **job)
    assert got["ids"].shape[1] > prompt.shape[1]
    assert got["ids"].tolist() == ref.tolist()
    # the KV-cache graph (same weights file) generates the same tokens
    assert ort_run(tmp_path, out, "greedy", graph=PAST_FILE, **job)["ids"].tolist() == ref.tolist()


def test_attention_quantization_and_8bit_positions_export(tmp_path):
    """quantize_attention's fake quantization and 8-bit position tables run in the graph too."""
    s = student("gpt2", 2, quantize_attention=True)
    export_model(s, tmp_path / "p", position_bits=8)
    export_onnx(tmp_path / "p", tmp_path / "o")
    got = ort_run(tmp_path, tmp_path / "o", "logits", **feed_of("gpt2", IDS, torch.ones_like(IDS)))["logits"]
    with torch.no_grad():
        lowbit = load_quantized(tmp_path / "p", mode="lowbit")(input_ids=IDS).logits.numpy()
    np.testing.assert_allclose(got, lowbit, atol=1e-4 * np.abs(lowbit).max(), rtol=0)


# ---------------------------------------------------------------- errors and the command line


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)).eval()


def test_unsupported_architecture_is_one_line(tmp_path):
    m = quantize_model(tiny_opt(), QuantConfig(weight_bits=2, embedding_bits=2))
    initialize_quantizers(m)
    for source in (m, None):
        if source is None:
            export_model(m, tmp_path / "p")
            source = tmp_path / "p"
        with pytest.raises(QgplmError) as e:
            export_onnx(source, tmp_path / "o")
        msg = str(e.value)
        assert "\n" not in msg and "OPTForCausalLM" in msg and "GPT-2" in msg and "BART" in msg, msg
    assert not (tmp_path / "o").exists()
    export_model(student("gpt2", 2), tmp_path / "g")
    with pytest.raises(QgplmError, match="in (lowbit|int8) mode"):
        export_onnx(load_quantized(tmp_path / "g", mode="lowbit"), tmp_path / "o")


def test_cli_format_onnx(tmp_path):
    """`python -m qgplm.export model=<saved HF dir> out=... format=onnx` (post-training quantized)."""
    hf = tmp_path / "hf"
    tiny_gpt2().save_pretrained(hf)
    for f in (SHARED_DATA / "gpt2-tokenizer").iterdir():
        if f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, hf / f.name)
    proc = _py(["qgplm.export", f"model={hf}", f"out={tmp_path / 'o'}", "format=onnx", "block_size=32"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ONNX total" in proc.stdout and "compression" in proc.stdout
    files = {p.name for p in (tmp_path / "o").iterdir()}
    assert {ONNX_FILE, DATA_FILE, "config.json", "tokenizer_config.json"} <= files and "model.safetensors" not in files
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o" / ONNX_FILE), load_external_data=False).metadata_props}
    assert meta["block_size"] == "32" and json.loads(meta["bits"]) == {"weight": [2], "embedding": [2]}
    out = ort_run(tmp_path, tmp_path / "o", "logits", **feed_of("gpt2", IDS[:1, :5], torch.ones_like(IDS[:1, :5])))
    assert out["logits"].shape == (1, 5, VOCAB)

    from qgplm.cli.export import main

    with pytest.raises(QgplmError, match="format='tflite' is not valid: choose one of qgplm, onnx, gguf"):
        main([f"model={hf}", f"out={tmp_path / 'x'}", "format=tflite"])
    with pytest.raises(QgplmError, match="block_size= only applies to format=onnx"):
        main([f"model={hf}", f"out={tmp_path / 'x'}", "block_size=32"])
