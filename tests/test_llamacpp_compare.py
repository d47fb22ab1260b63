"""experiments/llamacpp_compare.py's pieces on tiny random Llamas: the float GGUF writer
(qgplm/export/converters/gguf_float.py) against the HF model's logits, llama.cpp's own quantization through
`llama_model_quantize` (with and without an importance matrix), the perplexity protocol against
qgplm's evaluation windows and a by-hand NLL of llama.cpp's logits, the table and the error lines."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from qgplm.data.token_stream import IGNORE_INDEX, EvalWindows
from qgplm.export.converters.gguf_float import export_gguf_float, float_tensors
from qgplm.export.runtimes.llamacpp import LlamaCppLM
from tests.conftest import ROOT
from tests.test_gguf_llama import tiny

sys.path.insert(0, str(ROOT / "experiments"))
import llamacpp_compare as lc  # noqa: E402

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"model": tiny llama192, "f32": its F32 file, "f16": its F16 file}."""
    tmp = tmp_path_factory.mktemp("lc")
    m = tiny("llama192")
    return {"model": m, "f32": export_gguf_float(m, tmp / "f32.gguf", None, "f32"),
            "f16": export_gguf_float(m, tmp / "f16.gguf", None, "f16"), "tmp": tmp}


def test_eval_windows_are_qgplms():
    for n, block, stride in ((1000, 128, 127), (1000, 128, 500), (300, 64, 32), (129, 128, 127)):
        ref = EvalWindows(torch.arange(n), block, stride)
        ours = lc.eval_windows(n, block, stride)
        assert [s for s, _ in ours] == ref.starts
        for i, (s, first) in enumerate(ours):
            labels = ref[i]["labels"]
            scored = int((labels != IGNORE_INDEX).sum()) - (1 if i == 0 else 0)  # the first token has no context
            assert s + first + (block - first) == s + block and block - first == scored
    with pytest.raises(lc.CompareError, match="fewer than one window"):
        lc.eval_windows(100, 128, 127)


def test_window_nll_by_hand():
    rng = np.random.default_rng(0)
    logits, ids = rng.normal(size=(6, 11)).astype(np.float32), rng.integers(0, 11, 6)
    s, c = lc.window_nll(logits, ids, 2)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits[1:5]), torch.from_numpy(ids[2:6]),
                                             reduction="sum")
    assert c == 4 and s == pytest.approx(float(want), rel=1e-6)


def test_float_file_runs_as_the_hf_model(files):
    ids = list(range(3, 40))
    with torch.no_grad():
        want = files["model"](torch.tensor([ids])).logits[0].numpy()
    lm = LlamaCppLM(files["f32"], n_ctx=64, threads=1)
    got = lm.logits(ids)
    lm.close()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    table = lc.tensor_table(files["f16"])
    weights = {t.name: t for t in table if lc.is_weight(t)}
    assert {t.type for t in weights.values()} == {"f16"} and "output.weight" in weights  # llama192: untied head
    assert {t.type for t in table if "norm" in t.name} == {"f32"}
    assert lc.weight_bits(table) == 16.0
    n = sum(p.numel() for k, p in files["model"].state_dict().items() if "norm" not in k and "bias" not in k)
    assert sum(t.elements for t in weights.values()) == n
    assert [a.dtype for _, a in float_tensors(files["model"], "f32")] == [np.float32] * len(table)


def test_quantize_q4_0_and_measure_by_hand(files):
    out = files["tmp"] / "q4_0.gguf"
    lc.quantize(files["f16"], out, "Q4_0", threads=1)
    table = lc.tensor_table(out)
    # llama.cpp's Q4_0 recipe: Q4_0 matrices, the output matrix at Q6_K or, rows of 192 not fitting its
    # 256-block, Q8_0; 18 bytes per 32 weights = 4.5 bits, 34 = 8.5
    types = {t.name: t.type for t in table if lc.is_weight(t)}
    assert types.pop("output.weight") == "q8_0" and set(types.values()) == {"q4_0"}
    assert "q4_0" in lc.type_mix(table) and 4.5 < lc.weight_bits(table) < 8.5
    ids = np.random.default_rng(0).integers(3, 300, 150).astype(np.int32)
    got = lc.measure(out, ids, threads=1, block=64, stride=63)
    lm = LlamaCppLM(out, n_ctx=64, threads=1)
    nll = []
    for start, first in lc.eval_windows(len(ids), 64, 63):
        w = ids[start: start + 64]
        logp = torch.log_softmax(torch.from_numpy(lm.logits(w.tolist())).double(), -1)
        nll += [-float(logp[j - 1, w[j]]) for j in range(first, 64)]
    lm.close()
    assert got["scored"] == len(ids) - 1 == len(nll)
    assert got["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-6)
    assert got["rss_mib"] > 0 and got["pp_tok_s"] > 0 and got["tg_tok_s"] > 0
    row = lc.Row("llama.cpp Q4_0", "ptq", out, result=got, torch_ppl=got["ppl"] * 0.9)
    text = lc.table([row, lc.Row("llama.cpp IQ2_XS", "ptq", None, "no imatrix")])
    assert text.splitlines()[0] == "| " + " | ".join(lc.COLUMNS) + " |"
    assert "| llama.cpp Q4_0 | ptq | " in text and "not built: no imatrix" in text
    assert f"| {got['ppl'] * 0.9:.2f} (+11.1%) |" in text


def test_torch_perplexity_is_measures_protocol(files, tmp_path):
    """The PyTorch column scores the same windows as `measure`: the F32 file through llama.cpp and the HF
    model it was written from agree to float rounding; the value is computed once per key."""
    ids = np.random.default_rng(1).integers(3, 300, 150).astype(np.int32)
    got = lc.measure(files["f32"], ids, threads=1, block=64, stride=63)["ppl"]
    calls = []

    def compute() -> float:
        calls.append(1)
        return lc.torch_perplexity(files["model"], ids, 64, 63)

    assert lc.cached_torch_ppl(tmp_path, "k", compute) == pytest.approx(got, rel=1e-4)
    assert lc.cached_torch_ppl(tmp_path, "k", compute) == pytest.approx(got, rel=1e-4) and len(calls) == 1


def test_imatrix_is_the_mean_squared_input_and_iq2_takes_it(tmp_path):
    m = tiny("llama256", layers=1)
    ids = np.arange(3, 67)
    imatrix = lc.collect_imatrix(m, ids, chunk=32)
    assert set(imatrix) == {f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                            "ffn_up", "ffn_down")}
    seen = []
    h = m.model.layers[0].mlp.down_proj.register_forward_hook(lambda _m, i, _o: seen.append(i[0][0]))
    with torch.no_grad():
        m(torch.as_tensor(ids[:32])[None])
        m(torch.as_tensor(ids[32:])[None])
    h.remove()
    want = (torch.cat(seen) ** 2).mean(0).numpy()
    np.testing.assert_allclose(imatrix["blk.0.ffn_down.weight"], want, rtol=1e-5)
    f16 = export_gguf_float(m, tmp_path / "f16.gguf", None, "f16")
    with pytest.raises(lc.CompareError, match="IQ2_XS failed"):  # llama.cpp refuses IQ2 without one
        lc.quantize(f16, tmp_path / "no.gguf", "IQ2_XS", threads=1)
    lc.quantize(f16, tmp_path / "iq2.gguf", "IQ2_XS", imatrix, threads=1)
    assert "iq2_xs" in {t.type for t in lc.tensor_table(tmp_path / "iq2.gguf")}


def test_bad_input_is_one_line(tmp_path):
    script = str(ROOT / "experiments" / "llamacpp_compare.py")
    for argv, match in ((["--teacher", str(tmp_path), "--rows", "Q3_K"], "unknown row 'Q3_K'"),
                        (["--rows", "Q4_0"], "pass --teacher"),
                        (["--teacher", str(tmp_path), "--student-2bit", "q3_0"], "--student-2bit takes q2_0, q4_0"),
                        (["--teacher", str(tmp_path), "--cache", str(tmp_path / "c")], "holds no HF model")):
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
        assert match in proc.stderr
