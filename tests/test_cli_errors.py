"""The user's mistakes with `python -m qgplm.export` and `python -m qgplm.generate`.

As tests/test_errors.py does for `qgplm.run`: each case ends with exit code 2, exactly one
`error:` line naming the fix, no traceback, and nothing already written changed. Every argument
is typed and range-checked before any work, so the CLIs' main functions run in-process here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from qgplm.export import export_model
from qgplm.models import load_tokenizer
from tests.conftest import SHARED_DATA, main_error

POSITIONS = 32
LONG_PROMPT = "the cat sat on the mat . " * 10  # 71 GPT-2 tokens, more than the model's 32 positions

# (id, CLI, args with {placeholders} from the `files` fixture, substrings of the error line)
CASES = [
    # ---- generate
    ("gen-prompt-longer-than-positions", "generate", ["dir={export}", f"prompt={LONG_PROMPT}"],
     ["71 prompt tokens + max_new_tokens=32 exceed the model's 32 positions", "shorten the prompt"]),
    ("gen-prompt-plus-new-tokens-too-long", "generate", ["dir={export}", "prompt=the cat", "max_new_tokens=31"],
     ["2 prompt tokens + max_new_tokens=31 exceed the model's 32 positions", "lower max_new_tokens"]),
    ("gen-max-new-tokens-negative", "generate", ["dir={export}", "prompt=the", "max_new_tokens=-3"],
     ["max_new_tokens must be >= 1, got -3: set max_new_tokens=32"]),
    ("gen-max-new-tokens-zero", "generate", ["dir={export}", "prompt=the", "max_new_tokens=0"],
     ["max_new_tokens must be >= 1, got 0"]),
    ("gen-max-new-tokens-huge", "generate", ["dir={export}", "prompt=the", "max_new_tokens=1000000000000"],
     ["max_new_tokens=1000000000000 exceed the model's 32 positions"]),
    ("gen-max-new-tokens-not-a-number", "generate", ["dir={export}", "prompt=the", "max_new_tokens=many"],
     ["max_new_tokens='many' is not a valid int"]),
    ("gen-threads-negative", "generate", ["dir={export}", "prompt=the", "threads=-1"],
     ["threads must be in 0..", "got -1"]),
    ("gen-threads-beyond-the-cores", "generate", ["dir={export}", "prompt=the", "threads=100000"],
     ["threads must be in 0..", "this machine's cores", "got 100000"]),
    ("gen-block-size-not-a-power-of-2", "generate", ["dir={export}", "prompt=the", "mode=lowbit", "block_size=48"],
     ["block_size=48 is not valid: use a power of 2 >= 16"]),
    ("gen-block-size-negative", "generate", ["dir={export}", "prompt=the", "mode=lowbit", "block_size=-64"],
     ["block_size=-64 is not valid"]),
    ("gen-block-size-without-lowbit", "generate", ["dir={export}", "prompt=the", "block_size=64"],
     ["block_size= only applies to mode=lowbit (got mode=dequantize)"]),
    ("gen-block-size-with-gguf", "generate", ["dir={export}", "prompt=the", "mode=gguf", "block_size=64"],
     ["block_size= only applies to mode=lowbit (got mode=gguf)"]),
    ("gen-mode-unknown", "generate", ["dir={export}", "prompt=the", "mode=fast"],
     ["mode='fast' is not valid: choose one of dequantize, int8, lowbit, gguf"]),
    ("gen-prompt-empty", "generate", ["dir={export}", "prompt="], ["prompt= is empty"]),
    ("gen-prompt-missing", "generate", ["dir={export}"], ["missing prompt=..."]),
    ("gen-dir-missing", "generate", ["dir={tmp}/nowhere", "prompt=the"], ["is not a directory: pass an export dir"]),
    ("gen-dir-is-a-file", "generate", ["dir={a_file}", "prompt=the"], ["is not a directory"]),
    ("gen-dir-not-an-export", "generate", ["dir={not_empty}", "prompt=the"],
     ["is not a qgplm export (no qgplm_export.json)"]),
    ("gen-gguf-mode-on-a-packed-export", "generate", ["dir={export}", "prompt=the", "mode=gguf"],
     ["model.gguf does not exist: write it with python -m qgplm.export ... format=gguf"]),
    ("gen-unknown-key", "generate", ["dir={export}", "prompt=the", "temperature=0.7"],
     ["unknown argument 'temperature'"]),
    ("gen-not-key-value", "generate", ["dir={export}", "the"], ["argument 'the' is not key=value"]),
    # ---- export
    ("exp-out-is-a-file", "export", ["ckpt={tmp}/nowhere", "out={a_file}"],
     ["is a file, not a directory: choose a new out=<dir>"]),
    ("exp-out-not-empty", "export", ["ckpt={tmp}/nowhere", "out={not_empty}"],
     ["is not empty: choose a new out=<dir>"]),
    ("exp-out-under-a-file", "export", ["ckpt={tmp}/nowhere", "out={a_file}/sub/out"],
     ["cannot write to out=", "is a file, not a directory"]),
    ("exp-out-read-only", "export", ["ckpt={tmp}/nowhere", "out={read_only}/out"],
     ["cannot write to out=", "is not writable"]),
    ("exp-out-empty", "export", ["ckpt={tmp}/nowhere", "out="], ["out= is empty"]),
    ("exp-out-missing", "export", ["ckpt={tmp}/nowhere"], ["missing out=..."]),
    ("exp-format-unknown", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "format=tflite"],
     ["format='tflite' is not valid: choose one of qgplm, onnx, gguf"]),
    ("exp-block-size-without-onnx", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "block_size=64"],
     ["block_size= only applies to format=onnx (got format=qgplm)"]),
    ("exp-block-size-not-a-power-of-2", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "format=onnx",
                                                   "block_size=100"],
     ["block_size=100 is not valid: use a power of 2 >= 16"]),
    ("exp-gguf-2bit-unknown", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "format=gguf", "gguf_2bit=q3_k"],
     ["gguf_2bit='q3_k' is not valid: choose one of q2_0, q4_0"]),
    ("exp-gguf-2bit-without-gguf", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "gguf_2bit=q2_0"],
     ["gguf_2bit= only applies to format=gguf"]),
    ("exp-weight-bits-out-of-range", "export", ["model={tmp}/nowhere", "out={tmp}/o", "weight_bits=9"],
     ["weight_bits=9 is not valid: use an integer in 1..8, or null"]),
    ("exp-embedding-bits-not-a-number", "export", ["model={tmp}/nowhere", "out={tmp}/o", "embedding_bits=two"],
     ["embedding_bits='two' is not a valid integer or null"]),
    ("exp-position-bits-not-8", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "position_bits=4"],
     ["position_bits=4 is not valid: use 8 or null"]),
    ("exp-fp16-not-a-bool", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o", "fp16=maybe"],
     ["fp16='maybe' is not a valid bool"]),
    ("exp-kind-unknown", "export", ["model={tmp}/nowhere", "out={tmp}/o", "kind=encoder"],
     ["kind='encoder' is not valid: choose one of causal, seq2seq"]),
    ("exp-ckpt-and-model", "export", ["ckpt={tmp}/nowhere", "model={tmp}/nowhere", "out={tmp}/o"],
     ["pass exactly one of ckpt="]),
    ("exp-ckpt-missing", "export", ["ckpt={tmp}/nowhere", "out={tmp}/o"], ["does not exist"]),
]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A packed export of a tiny GPT-2 (32 positions, GPT-2's tokenizer) and the paths the mistakes
    point at: a regular file, a non-empty dir, a read-only dir."""
    tmp = tmp_path_factory.mktemp("cli")
    tok = load_tokenizer(str(SHARED_DATA / "gpt2-tokenizer"))
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=POSITIONS, vocab_size=len(tok)))
    export_model(model, tmp / "export", tok)
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "not_empty").mkdir()
    (tmp / "not_empty" / "notes.txt").write_text("earlier file\n")
    (tmp / "read_only").mkdir()
    (tmp / "read_only").chmod(0o555)
    yield {"tmp": str(tmp), "export": str(tmp / "export"), "a_file": str(tmp / "a_file"),
           "not_empty": str(tmp / "not_empty"), "read_only": str(tmp / "read_only")}
    (tmp / "read_only").chmod(0o755)


def mains():
    from qgplm.cli.export import main as export_main
    from qgplm.cli.generate import main as generate_main

    return {"export": export_main, "generate": generate_main}


@pytest.mark.parametrize("cli, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_mistake_ends_in_one_clear_line(files, capsys, cli, args, expected):
    if "{read_only}" in " ".join(args) and os.access(files["read_only"], os.W_OK):
        pytest.skip("running as root: chmod does not block writes (exp-out-under-a-file covers an unwritable dir)")
    tmp = Path(files["tmp"])
    before = _tree_digest(tmp)
    err = main_error(mains()[cli], [a.format(**files) for a in args], capsys)
    for text in expected:
        assert text in err, err
    assert _tree_digest(tmp) == before, "a file already written was changed"
    assert not (tmp / "o").exists()


def test_generate_runs_at_the_edge_of_the_positions(files, capsys):
    """The check is exact: 2 prompt tokens + 30 new tokens fill the 32 positions and generate."""
    from qgplm.cli.generate import main

    assert main([f"dir={files['export']}", "prompt=the cat", "max_new_tokens=30"]) == 0
    assert capsys.readouterr().err == ""
