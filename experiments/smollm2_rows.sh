#!/usr/bin/env bash
# Every row of the SmolLM2-135M comparison (docs/results.md), one `qgplm.run` per row, in the order that
# decides the most first: WikiText-2's central ablation and LSQ, post-training quantization, a second seed,
# the other QAT methods, W4, per-token activations, per-row scales, the W2 methods under bf16 autocast,
# QuantGPT from the fixed initial gamma, then Penn Treebank's decisive rows and the rest of its rows.
# On 2 CPU cores a QAT row took 22-30 minutes with other jobs sharing the cores (docs/results.md), a
# post-training row 11 (its validation and test).
#
#   bash experiments/smollm2_rows.sh               # all rows; rows already done (metrics.json) are skipped
#   bash experiments/smollm2_rows.sh wt2_core      # one group: wt2_core wt2_ptq wt2_seeds wt2_methods wt2_w4
#                                                  #   wt2_token wt2_per_row wt2_bf16 wt2_gamma_fixed
#                                                  #   wt2_w4_per_row per_row_fixed per_row_more ptb ptb_rest
#   RESULTS=<dir> bash experiments/smollm2_rows.sh # results elsewhere (default experiments/results)
#   ONLY='w2/(pact|twn)$' bash experiments/smollm2_rows.sh wt2_methods   # only the rows whose path matches
#   python experiments/table.py experiments/results/smollm2_wt2   # the tables, at any time
#
# A row killed half-way is started again from its beginning (its directory is replaced): rows are short.
# Extra Hydra overrides for every run: QGPLM_OVERRIDES="trainer.precision=bf16-mixed".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RESULTS="${RESULTS:-$ROOT/experiments/results}"
read -r -a EXTRA <<< "${QGPLM_OVERRIDES:-}"

run() {  # run <experiment> <row dir, relative to the experiment's results> <overrides...>
    local exp="$1" row="$2"; shift 2
    local dir="$RESULTS/$exp/$row"
    if [[ -n "${ONLY:-}" && ! "$exp/$row" =~ $ONLY ]]; then return; fi
    if [[ -f "$dir/metrics.json" ]]; then echo "done: $exp/$row"; return; fi
    rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
    echo "+ [$(date -u +%H:%M:%S)] $exp/$row: $*"
    local t=$SECONDS
    (cd "$ROOT" && python -m qgplm.run "experiment=$exp" "$@" "${EXTRA[@]}" "hydra.run.dir=$dir") > "$dir.out" 2>&1 \
        || { echo "FAILED: $exp/$row (see $dir.out)"; return 0; }
    echo "  $exp/$row done in $((SECONDS - t)) s"
}

teacher() {  # the fine-tuned teacher of <experiment>, and the pretrained model as is (no fine-tuning)
    run "$1" teacher_as_is stage=teacher teacher.max_steps=0
    run "$1" teacher stage=teacher
}

student() {  # student <experiment> <row> <method> <bits> [overrides...]
    local exp="$1" row="$2" method="$3" bits="$4"; shift 4
    run "$exp" "$row" stage=quantize "teacher_path=$RESULTS/$exp/teacher" "method=$method" "bits=$bits" "$@"
}

wt2_core() {
    teacher smollm2_wt2
    for m in quantgpt quantgpt_no_contrastive lsq; do student smollm2_wt2 "w2/$m" "$m" 2; done
}
wt2_ptq() {  # no QAT: each quantizer's initial scales, the same quantized modules and 8-bit activations
    for b in 2 4 8; do
        for m in quantgpt lsq; do student smollm2_wt2 "ptq/${m}_w$b" "$m" "$b" student.max_steps=0; done
    done
}
wt2_seeds() {
    for m in quantgpt quantgpt_no_contrastive; do student smollm2_wt2 "w2/${m}_seed1" "$m" 2 seed=1; done
}
wt2_methods() {
    for m in quantgpt_full_grid kd_only pact twn; do student smollm2_wt2 "w2/$m" "$m" 2; done
}
wt2_w4() {
    for m in quantgpt lsq; do student smollm2_wt2 "w4/$m" "$m" 4; done
}
wt2_token() {  # per-token 8-bit activations (method.activation_granularity=token): the per-tensor A8 cost
    student smollm2_wt2 w4/lsq_token lsq 4 method.activation_granularity=token
    student smollm2_wt2 w2/quantgpt_token quantgpt 2 method.activation_granularity=token
    student smollm2_wt2 w4/quantgpt_token quantgpt 4 method.activation_granularity=token
    student smollm2_wt2 w2/quantgpt_no_contrastive_token quantgpt_no_contrastive 2 method.activation_granularity=token
}
wt2_per_row() {  # one weight scale per output row (method.per_row=true): does it change the W2 ordering?
    for m in quantgpt lsq; do student smollm2_wt2 "w2/${m}_per_row" "$m" 2 method.per_row=true; done
}
wt2_bf16() {  # W2 rows again under bf16 autocast (fast on CPUs with avx512_bf16 or AMX): does bf16 change them?
    local bf16=trainer.precision=bf16-mixed
    for m in quantgpt pact twn kd_only lsq; do student smollm2_wt2 "w2_bf16/$m" "$m" 2 "$bf16"; done
    student smollm2_wt2 w2_bf16/pact_seed1 pact 2 seed=1 "$bf16"
    # PACT learns alpha itself, QuantGPT gamma = alpha / mean|w| (mean|w| ~0.15 here): at the same scale_lr
    # QuantGPT's clipping values move ~7x less a step. The same relative speed:
    student smollm2_wt2 w2_bf16/quantgpt_scale_lr1e-2 quantgpt 2 student.optim.scale_lr=1.0e-2 "$bf16"
    # PACT's alphas start at 1.4 mean|w| (QuantGPT's fixed multiple), QuantGPT's at the MSE-optimal gamma:
    student smollm2_wt2 w2_bf16/quantgpt_gamma_fixed quantgpt 2 method.quantizer_kwargs.gamma_init=fixed "$bf16"
}
wt2_gamma_fixed() {  # QuantGPT from PACT's start (gamma 1.4): more seeds, and the contrastive ablation from there
    local fixed=(method.quantizer_kwargs.gamma_init=fixed trainer.precision=bf16-mixed)
    student smollm2_wt2 w2_bf16/quantgpt_gamma_fixed_seed1 quantgpt 2 seed=1 "${fixed[@]}"
    student smollm2_wt2 w2_bf16/quantgpt_no_contrastive_gamma_fixed quantgpt_no_contrastive 2 "${fixed[@]}"
    student smollm2_wt2 w2_bf16/quantgpt_no_contrastive_gamma_fixed_seed1 quantgpt_no_contrastive 2 seed=1 \
        "${fixed[@]}"
    student smollm2_wt2 w2_bf16/quantgpt_per_row_gamma_fixed quantgpt 2 method.per_row=true "${fixed[@]}"
}
wt2_w4_per_row() {  # W4E4A8 with one scale per output row and per-token activations: per tensor, the 4-bit
    # linear weights alone destroy the model before training (docs/results.md, "Where the error comes from")
    local bf16=trainer.precision=bf16-mixed
    for m in quantgpt lsq; do
        student smollm2_wt2 "w4/${m}_per_row_token" "$m" 4 method.per_row=true method.activation_granularity=token "$bf16"
    done
}
per_row_fixed() {  # one scale per output row, QuantGPT from the fixed start: the methods and the central
    # ablation again in the setting that gave the lowest W2E2A8 row, on both tasks (bf16)
    local fixed=method.quantizer_kwargs.gamma_init=fixed per_row=method.per_row=true bf16=trainer.precision=bf16-mixed
    student smollm2_wt2 w2_bf16/pact_per_row pact 2 "$per_row" "$bf16"
    student smollm2_ptb w2/quantgpt_per_row_gamma_fixed quantgpt 2 "$per_row" "$fixed" "$bf16"
    student smollm2_ptb w2/pact_per_row pact 2 "$per_row" "$bf16"
    student smollm2_wt2 w2_bf16/quantgpt_no_contrastive_per_row_gamma_fixed quantgpt_no_contrastive 2 "$per_row" \
        "$fixed" "$bf16"
    student smollm2_wt2 w2_bf16/quantgpt_per_row_gamma_fixed_seed1 quantgpt 2 seed=1 "$per_row" "$fixed" "$bf16"
    student smollm2_ptb w2/lsq_per_row lsq 2 "$per_row" "$bf16"
    student smollm2_ptb w2/quantgpt_no_contrastive_per_row_gamma_fixed quantgpt_no_contrastive 2 "$per_row" \
        "$fixed" "$bf16"
}
per_row_more() {  # per row, PACT led QuantGPT on WikiText-2 (same 1.4 mean|w| start): PACT's second seed, and
    # QuantGPT's scales at PACT's relative speed (alpha = gamma mean|w|: PACT's alpha moves ~7x more a step)
    local fixed=method.quantizer_kwargs.gamma_init=fixed per_row=method.per_row=true bf16=trainer.precision=bf16-mixed
    student smollm2_wt2 w2_bf16/pact_per_row_seed1 pact 2 seed=1 "$per_row" "$bf16"
    student smollm2_wt2 w2_bf16/quantgpt_per_row_gamma_fixed_scale_lr1e-2 quantgpt 2 "$per_row" "$fixed" \
        student.optim.scale_lr=1.0e-2 "$bf16"
    student smollm2_wt2 w2_bf16/quantgpt_per_row_gamma_fixed_scale_lr1e-2_seed1 quantgpt 2 seed=1 "$per_row" \
        "$fixed" student.optim.scale_lr=1.0e-2 "$bf16"
}
ptb() {  # the students of docs/results.md ran under bf16: QGPLM_OVERRIDES="trainer.precision=bf16-mixed"
    local fixed=method.quantizer_kwargs.gamma_init=fixed
    teacher smollm2_ptb
    for m in quantgpt pact lsq quantgpt_no_contrastive quantgpt_full_grid; do student smollm2_ptb "w2/$m" "$m" 2; done
    student smollm2_ptb w2/quantgpt_gamma_fixed quantgpt 2 "$fixed"
    student smollm2_ptb w2/quantgpt_gamma_fixed_seed1 quantgpt 2 seed=1 "$fixed"
    student smollm2_ptb w2/pact_seed1 pact 2 seed=1
    student smollm2_ptb w2/quantgpt_gamma_fixed_seed2 quantgpt 2 seed=2 "$fixed"  # third seeds: QuantGPT and PACT
    student smollm2_ptb w2/pact_seed2 pact 2 seed=2
    student smollm2_ptb w2/quantgpt_no_contrastive_gamma_fixed quantgpt_no_contrastive 2 "$fixed"
}
ptb_rest() {  # Penn Treebank's other W2 methods and its W4 rows (bf16 as above)
    for m in twn kd_only; do student smollm2_ptb "w2/$m" "$m" 2; done
    for m in quantgpt lsq; do student smollm2_ptb "w4/$m" "$m" 4; done
}

ALL_GROUPS=(wt2_core wt2_ptq wt2_seeds wt2_methods wt2_w4 wt2_token wt2_per_row wt2_bf16 wt2_gamma_fixed wt2_w4_per_row
            per_row_fixed per_row_more ptb ptb_rest)
groups=("$@")
[[ ${#groups[@]} -gt 0 ]] || groups=("${ALL_GROUPS[@]}")
for g in "${groups[@]}"; do  # every name is checked before any row runs
    [[ " ${ALL_GROUPS[*]} " == *" $g "* ]] || { echo "error: unknown group $g: choose from ${ALL_GROUPS[*]}" >&2; exit 2; }
done
for g in "${groups[@]}"; do "$g"; done
