#!/usr/bin/env bash
# One prepared GPU check of the GPU path, about 10 minutes on one GPU. Needs only this repo
# and the machine's own CUDA PyTorch: no downloads. What the machine lacks travels with the repo in
# .gpu_bundle/ (ignored by git), made here by `make gpu-bundle`:
#   - wheels/: qgplm's Python dependencies missing from a bare CUDA image (hydra-core, omegaconf,
#     antlr4, rouge-score, nltk, gguf, accelerate; psutil, installed only where the machine has none),
#     installed offline (pip --no-index) into a temporary folder on PYTHONPATH; nothing else on the
#     machine changes;
#   - data/: a copy of ../shared/data (WikiText-2, the tokenizers, the samples the tests read);
#   - models/ (optional, make gpu-bundle GPU_BUNDLE_GGUF=1): the SmolLM2 GGUF file of step 4.
#   bash experiments/gpu_check.sh [DATA_DIR] [OUT_DIR]
# DATA_DIR defaults to $QGPLM_DATA_DIR, then .gpu_bundle/data, then ../shared/data.
# 1. the fast tests of the GPU path with CUDA visible (tests/test_cuda.py's CUDA half, bf16,
#    presets, FSDP set-up, bench);
# 2. a QAT pipeline run of a GPT-2-small-shaped model (12 x 768, random init, GPT-2's tokenizer
#    from the data dir) on WikiText-2 from the data dir, trainer=gpu (bf16-mixed), short budgets;
# 3. step time, peak GPU memory and tokens/s of FP fine-tuning, KD-only and QuantGPT
#    (experiments/bench_cost.py at GPT-2 small's size, cuda, bf16-mixed);
# 4. a few-minute version of experiment=paper_smollm2_wt2: the pretrained SmolLM2-135M-Instruct from its
#    GGUF file, 30 teacher steps and 300 W2E2A8 QuantGPT student steps at 512 x 16 tokens (each stage
#    capped at 4 minutes), full WikiText-2 test set; prints the student's test PPL and training tokens/s.
#    The GGUF file: $GPU_CHECK_GGUF, else .gpu_bundle/models/, else ../shared/models/
#    (SmolLM2-135M-Instruct*.gguf); with none of them the step is skipped, saying so.
# GPU_CHECK_STEPS="2 4" runs only those steps (default: all four).
# Everything is written under OUT_DIR (default: experiments/results/gpu_check/<timestamp>).
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU at toy sizes (step 1 only collects the tests),
# to check the script itself (tests/test_bench_cost.py); its figures mean nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="${GPU_CHECK_BUNDLE:-$ROOT/.gpu_bundle}"
if [ -n "${1:-}" ]; then DATA="$1"
elif [ -n "${QGPLM_DATA_DIR:-}" ]; then DATA="$QGPLM_DATA_DIR"
elif [ -d "$BUNDLE/data" ]; then DATA="$BUNDLE/data"
else DATA="$ROOT/../shared/data"; fi
OUT="${2:-$ROOT/experiments/results/gpu_check/$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
STEPS="${GPU_CHECK_STEPS:-1 2 3 4}"
SHARED="${GPU_CHECK_SHARED:-$ROOT/../shared}"
cd "$ROOT"

fail() { echo "gpu_check: error: $*" >&2; exit 2; }
step() { echo; echo "=== gpu_check: $* ($(date +%T))"; }

# what runs where: GPT-2 small's shape on the GPU; toy sizes on the CPU in smoke mode
QAT_SIZE=(model.config.n_layer=12 model.config.n_embd=768 model.config.n_head=12 model.config.n_positions=1024
          task.block_size=512 task.batch_size=8 task.eval_batch_size=16 task.max_eval_tokens=100000)
QAT_BUDGET=(teacher.max_steps=100 teacher.eval_every=100 student.max_steps=100 student.eval_every=100)
QAT_TRAINER=(trainer=gpu)
BENCH=(--size gpt2-small --device cuda --precision bf16-mixed --block 512 --batch 8 --steps 20 --warmup 5)
TESTS=(-m "not slow")
# step 4: experiment=paper_smollm2_wt2 (512 x 16 tokens per step, bf16-mixed, full test set) on a shorter budget;
# max_time caps each stage, so a slower GPU than planned shortens the stage instead of overrunning the check
SMOL_SIZE=()
SMOL_BUDGET=(teacher.max_steps=30 teacher.eval_every=30 teacher.optim.warmup_steps=5 student.max_steps=300
             student.eval_every=300 student.optim.warmup_steps=30 +trainer.max_time=00:00:04:00)
SMOL_TRAINER=()
if [ "$SMOKE" = 1 ]; then
  QAT_SIZE=(model.config.n_layer=1 model.config.n_embd=32 model.config.n_head=2 model.config.n_positions=64
            task.block_size=32 task.batch_size=4 task.eval_batch_size=8 task.max_train_tokens=4000
            task.max_eval_tokens=1000)
  QAT_BUDGET=(teacher.max_steps=4 teacher.eval_every=4 student.max_steps=4 student.eval_every=4)
  QAT_TRAINER=(trainer=cpu trainer.precision=bf16-mixed)
  BENCH=(--layers 1 --width 64 --vocab 128 --block 16 --batch 2 --steps 2 --warmup 1 --device cpu
         --precision bf16-mixed)
  TESTS=(--collect-only -m "not slow")
  SMOL_SIZE=(task.block_size=32 task.batch_size=4 task.eval_batch_size=8 task.num_workers=0
             task.max_train_tokens=4000 task.max_eval_tokens=1000)
  SMOL_BUDGET=(teacher.max_steps=2 teacher.eval_every=2 teacher.optim.warmup_steps=1 student.max_steps=4
               student.eval_every=4 student.optim.warmup_steps=1 +trainer.max_time=00:00:04:00)
  SMOL_TRAINER=(trainer=cpu)
fi
for s in $STEPS; do
  case "$s" in 1|2|3|4) ;; *) fail "GPU_CHECK_STEPS=\"$STEPS\" names step \"$s\": use a list of 1 2 3 4" ;; esac
done
want() { [[ " $STEPS " == *" $1 "* ]]; }

# step 4's GGUF teacher: GPU_CHECK_GGUF, then the bundle's, then ../shared's; checked here, before any GPU time
GGUF="" GGUF_FROM="" GGUF_SKIP=""
if want 4; then
  if [ -n "${GPU_CHECK_GGUF:-}" ]; then
    [ -f "$GPU_CHECK_GGUF" ] || fail "GPU_CHECK_GGUF=$GPU_CHECK_GGUF is not a file: point it at a .gguf file or unset it"
    GGUF="$GPU_CHECK_GGUF" GGUF_FROM="GPU_CHECK_GGUF"
  else
    for dir in "$BUNDLE/models" "$SHARED/models"; do
      f="$(compgen -G "$dir/SmolLM2-135M-Instruct*.gguf" | sort | head -n 1 || true)"
      if [ -n "$f" ]; then GGUF="$f" GGUF_FROM="$dir"; break; fi
    done
    [ -n "$GGUF" ] || GGUF_SKIP="no SmolLM2-135M-Instruct*.gguf in \$GPU_CHECK_GGUF (unset), $BUNDLE/models or \
$SHARED/models (make gpu-bundle GPU_BUNDLE_GGUF=1, or set GPU_CHECK_GGUF=<path>)"
  fi
  if [ -n "$GGUF" ]; then
    [ "$(head -c 4 "$GGUF")" = GGUF ] || fail "$GGUF (from $GGUF_FROM) is not a GGUF file (no GGUF magic): \
copy the file again or point GPU_CHECK_GGUF at a .gguf file"
    GGUF="$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")"
  fi
fi

[ -d "$DATA/wikitext-2" ] || fail "no WikiText-2 under $DATA (pass the data dir as the first argument, or make gpu-bundle)"
[ -f "$DATA/gpt2-tokenizer/vocab.json" ] || fail "no GPT-2 tokenizer under $DATA/gpt2-tokenizer"
DATA="$(cd "$DATA" && pwd)"
if [ "$SMOKE" != 1 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "torch.cuda.is_available() is False: this needs a CUDA build of torch and a visible GPU"
fi
SITE=""
if compgen -G "$BUNDLE/wheels/*.whl" > /dev/null; then
  # offline (--no-index), only the carried wheels (--no-deps), into a folder of its own
  # pure-Python wheels always; a platform wheel (psutil) only where the machine has no such distribution,
  # so a machine's own build is never shadowed by this one's
  WHEELS=()
  for w in "$BUNDLE"/wheels/*.whl; do
    case "$w" in
      *-none-any.whl) WHEELS+=("$w") ;;
      *) "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$(basename "$w" | cut -d- -f1)" \
           2>/dev/null || WHEELS+=("$w") ;;
    esac
  done
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/qgplm-gpu-site.XXXXXX")"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "${WHEELS[@]}" || fail "installing the carried wheels from $BUNDLE/wheels failed (make gpu-bundle again)"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 QGPLM_DATA_DIR="$DATA"
export PYTHONPATH="$ROOT${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import qgplm, lightning, transformers, hydra, omegaconf" 2>/dev/null \
  || fail "qgplm or its dependencies are not importable with $PY (make gpu-bundle here, carry .gpu_bundle; this script downloads nothing)"
if [ -n "$GGUF" ]; then  # what transformers' GGUF loader needs (it refuses GGUF files without accelerate)
  "$PY" -c "import gguf, accelerate" 2>/dev/null \
    || fail "step 4 (SmolLM2 from $GGUF) needs gguf and accelerate, not importable with $PY (make gpu-bundle: \
GPU_WHEELS has both; carry .gpu_bundle), or GPU_CHECK_STEPS=\"1 2 3\" to leave the step out"
fi
mkdir -p "$OUT"
"$PY" - <<'PYEOF' | tee "$OUT/device.txt"
import hydra, lightning, torch, transformers
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (smoke mode)"
print(f"torch {torch.__version__} cuda {torch.version.cuda} {dev}; lightning {lightning.__version__}, "
      f"transformers {transformers.__version__}, hydra {hydra.__version__}")
PYEOF
T0=$SECONDS

if want 1; then
step "1/4 fast tests with CUDA visible"
"$PY" -m pytest -q -x "${TESTS[@]}" -p no:cacheprovider tests/test_cuda.py tests/test_bf16.py tests/test_presets.py \
  tests/test_fsdp.py tests/test_bench_cost.py > "$OUT/tests.txt" 2>&1 \
  || { tail -n 30 "$OUT/tests.txt"; fail "fast tests failed: see $OUT/tests.txt"; }
tail -n 3 "$OUT/tests.txt"
fi

if want 2; then
step "2/4 QAT pipeline, GPT-2-small shape (12 x 768, random init), WikiText-2, trainer=gpu (bf16-mixed)"
"$PY" -m qgplm.run "${QAT_TRAINER[@]}" task=wikitext2 task.data_dir="$DATA/wikitext-2" \
  model.tokenizer="$DATA/gpt2-tokenizer" "${QAT_SIZE[@]}" "${QAT_BUDGET[@]}" \
  method=quantgpt bits=2 generate_samples=1 logger=csv hydra.run.dir="$OUT/qat_run" > "$OUT/qat_run.txt" 2>&1 \
  || { tail -n 30 "$OUT/qat_run.txt"; fail "the QAT run failed: see $OUT/qat_run.txt"; }
tail -n 12 "$OUT/qat_run.txt"
"$PY" - "$OUT/qat_run/metrics.json" <<'PYEOF'
import json, math, sys
m = json.load(open(sys.argv[1]))
t, s = m["teacher"]["test_ppl"], m["student"]["test_ppl"]
print(f"teacher test PPL {t:.2f}, W2E2A8 student {s:.2f}, wall time {m['wall_time_s']}")
sys.exit(0 if math.isfinite(t) and math.isfinite(s) else "non-finite perplexity")
PYEOF
fi

if want 3; then
step "3/4 step time / peak memory / tokens/s: FP fine-tuning, KD-only, QuantGPT (bf16-mixed)"
"$PY" experiments/bench_cost.py "${BENCH[@]}" --json > "$OUT/bench_cost.txt" 2>&1 \
  || { tail -n 30 "$OUT/bench_cost.txt"; fail "the cost benchmark failed: see $OUT/bench_cost.txt"; }
grep -v '^{' "$OUT/bench_cost.txt"
fi

if want 4; then
step "4/4 SmolLM2-135M from its GGUF file: experiment=paper_smollm2_wt2, short budget, W2E2A8 QuantGPT"
if [ -z "$GGUF" ]; then
  echo "gpu_check: step 4 skipped: $GGUF_SKIP"
else
  echo "teacher: $GGUF (from $GGUF_FROM)"
  "$PY" -m qgplm.run experiment=paper_smollm2_wt2 "${SMOL_TRAINER[@]}" model.gguf_file="$GGUF" \
    task.data_dir="$DATA/wikitext-2" "${SMOL_SIZE[@]}" "${SMOL_BUDGET[@]}" method=quantgpt bits=2 \
    generate_samples=1 logger=csv hydra.run.dir="$OUT/smollm2_run" > "$OUT/smollm2_run.txt" 2>&1 \
    || { tail -n 30 "$OUT/smollm2_run.txt"; fail "the SmolLM2 run failed: see $OUT/smollm2_run.txt"; }
  tail -n 8 "$OUT/smollm2_run.txt"
  "$PY" - "$OUT/smollm2_run/metrics.json" "${SMOL_BUDGET[@]}" <<'PYEOF'
import json, math, sys
m = json.load(open(sys.argv[1]))
budget = dict(a.split("=", 1) for a in sys.argv[2:])
t, s = m["teacher"], m["student"]
def speed(f, stage):
    sp = f.get("train_throughput") or {}
    if not sp.get("tokens_per_s"):
        return f"{stage}: no training step timed"
    ran = sp["batches_timed"] + sp["batches_skipped"]
    return (f"{stage} training {sp['tokens_per_s']:,.0f} tokens/s ({sp['batch_s'] * 1000:.0f} ms per step of "
            f"{sp['tokens'] // sp['batches_timed']:,} tokens, {ran} of {budget[stage + '.max_steps']} steps run)")
test_tokens = m["protocol"].get("tokens", {}).get("test", "?")
print(f"SmolLM2-135M on WikiText-2 test ({test_tokens:,} tokens): teacher PPL {t['test_ppl']:.2f}, "
      f"W2E2A8 QuantGPT student PPL {s['test_ppl']:.2f} ({m['ppl_ratio']:.2f}x the teacher)")
print(speed(t, "teacher"))
print(speed(s, "student"))
print(f"wall time: teacher stage {m['wall_time_s']['teacher']:.0f} s, student stage {m['wall_time_s']['student']:.0f} s, "
      f"whole run {m['wall_time_s']['total']:.0f} s")
sys.exit(0 if math.isfinite(t["test_ppl"]) and math.isfinite(s["test_ppl"]) else "non-finite perplexity")
PYEOF
fi
fi

echo
echo "gpu_check: all passed in $((SECONDS - T0)) s${GGUF_SKIP:+ (step 4 skipped: no SmolLM2 GGUF file)}; outputs in $OUT"
