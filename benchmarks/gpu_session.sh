#!/usr/bin/env bash
# The GPU session of issue 8, stage by stage (see benchmarks/GPU_SESSION.md for the device calls).
#
#   benchmarks/gpu_session.sh STAGE [STAGE ...]      (from anywhere; it works in the repository root)
#
# Stages:
#   wheels    HERE, with PyPI: fill .whl/ with the wheels the device lacks; copy the CIFAR-10 archive to .data/
#   setup     device: install the wheels and the package; record GPU, CUDA and versions; decode the data once
#             (skipped on a machine already set up, so every call may begin with it)
#   train     device: probe, plan (epochs, concurrent or sequential) and train robust_resnet_a0 and wrn_22_5
#             with the quick_cifar10 recipe into .runs/<model>; stops cleanly before the call's limit and
#             resumes unfinished runs when called again
#   evaluate  device: clean/pgd20/cw40/aa on 1,000 test images for each trained model; bf16 precision check
#             and AutoAttack ours-vs-RobustBench on the better one
#   speed     device: bf16 matmul peak, TRADES training img/s (a1, wrn_28_10 at 128 and 512), inference
#             throughput of every model at batch 256
#   collect   pack results and the trained models into $OUT (else .runs/collect); every device stage ends with it
#   chain     setup, train, train, evaluate, speed (the smoke chain)
#
# Environment:
#   GPU_SESSION_SMOKE=1  run the device stages on this CPU with tiny models and data, no installs (minutes)
#   CALL_T0              when the device call began (`export CALL_T0=$(date +%s)` first); default: now
#   CALL_LIMIT_S (600), MARGIN_S (45)   the call's limit, and what is left for stopping and collecting
#   TRAIN_BUDGET_S (840) total training seconds across calls, for the plan; TRAIN_MAX_EPOCHS (30, the recipe's);
#   TRAIN_MODE (auto | concurrent | sequential) overrides the probe's choice; TOGETHER_EPOCH_S (8) sizes the
#   concurrent probe's epochs
#   GPU_SESSION_RUNS (.runs), GPU_SESSION_RESULTS (benchmarks/results/gpu), GPU_SESSION_DATA, PYTHON
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

SMOKE=${GPU_SESSION_SMOKE:-0}
T0=${CALL_T0:-$(date +%s)}
CALL_LIMIT_S=${CALL_LIMIT_S:-600}
MARGIN_S=${MARGIN_S:-45}
PY=${PYTHON:-python3}
MODELS=${GPU_SESSION_MODELS:-robust_resnet_a0,wrn_22_5}
RECIPE=${TRAIN_RECIPE:-quick_cifar10}
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-840}
WHEELS=(robustbench==1.1.1 pyautoattack==0.2.0 gdown==5.1.0 geotorch==0.4.0 beautifulsoup4==4.15.0 timm==1.0.31)
DATA_SHA256=70260124a4d2364bd32a0a222ddcd4197d2afa56725518368da092f67d4c29fe
if [[ $SMOKE == 1 ]]; then
  RUNS=${GPU_SESSION_RUNS:-.runs/smoke}
  RESULTS=${GPU_SESSION_RESULTS:-$RUNS/published}
  DATA=${GPU_SESSION_DATA:-../shared/data/cifar10-jpeg.tar.gz}
  DEVICE=cpu
  KW='{"depths":[1,1,1],"widths":[1,1,1]}'
  TRAIN_SETS=(data.train_subset=128 data.holdout=16 run.batch_size=16 run.device=cpu attack.steps=2
              eval.pgd_steps=1 eval.max_examples=16 eval.batch_size=16)
  PROBE_STEPS=2 TOGETHER_EPOCH_S=0 MAX_EPOCHS=1 OVERHEAD_S=0 STARTUP_S=5 STEPS_PER_CALL=${TRAIN_STEPS_PER_CALL:-5}
  N_EXAMPLES=16 AA_N=4
  EVAL_ATTACKS=clean,pgd2,cw2,aa:apgd-ce PRECISION_ATTACKS=clean,pgd2,aa:apgd-ce
  MATMUL=(--size 256)
  TRAIN_SPEED_MODELS=preact_resnet TRAIN_SPEED=(--batch-sizes 4 --steps 2 --warmup 1)
  THROUGHPUT_PARTS=(cifar:preact_resnet) THROUGHPUT=(--batch-size 2 --warmup 0 --iters 1)
else
  RUNS=${GPU_SESSION_RUNS:-.runs}
  RESULTS=${GPU_SESSION_RESULTS:-benchmarks/results/gpu}
  # carried paths are replaced at every call (a new file, a new modification time: the decoded cache would be
  # rebuilt): setup copies the carried archive once into the runs folder, which a warm machine keeps, and the
  # decoded cache lives there too
  DATA=${GPU_SESSION_DATA:-$RUNS/data/cifar10-jpeg.tar.gz}
  export ROBUST_RESNETS_CACHE=${ROBUST_RESNETS_CACHE:-$RUNS/cache}
  DEVICE=cuda
  KW='{}'
  TRAIN_SETS=()
  PROBE_STEPS=${PROBE_STEPS:-30} TOGETHER_EPOCH_S=${TOGETHER_EPOCH_S:-8}
  MAX_EPOCHS=${TRAIN_MAX_EPOCHS:-30} OVERHEAD_S=${TRAIN_OVERHEAD_S:-60}
  STARTUP_S=${TRAIN_STARTUP_S:-30} STEPS_PER_CALL=${TRAIN_STEPS_PER_CALL:-}
  N_EXAMPLES=1000 AA_N=1000
  EVAL_ATTACKS=clean,pgd20,cw40,aa PRECISION_ATTACKS=clean,pgd20,aa:apgd-ce
  MATMUL=()
  TRAIN_SPEED_MODELS=robust_resnet_a1,wrn_28_10 TRAIN_SPEED=(--batch-sizes 128,512)
  THROUGHPUT_PARTS=('cifar:preact_resnet,robust_resnet_*,wrn_*,advrush,racl,robnet_free,robnet_large_v1,robnet_large_v2'
                    'imagenet:*_convstem,robnet_large_imagenet')
  THROUGHPUT=(--batch-size 256)
fi
STATE=$RUNS/results   # every JSON is written here first (ignored, kept between calls on a warm machine)
LOGS=$STATE/logs
export PYTHONUNBUFFERED=1

say() { printf '[gpu_session %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "error: $*" >&2; exit 1; }
remaining() { echo $(( T0 + CALL_LIMIT_S - MARGIN_S - $(date +%s) )); }
helper() { "$PY" -m benchmarks.gpu_session "$@"; }
CARRIED_DATA=.data/cifar10-jpeg.tar.gz
need_data() {
  if [[ ! -f $DATA && $SMOKE != 1 && -z ${GPU_SESSION_DATA:-} && -f $CARRIED_DATA ]]; then
    mkdir -p "$(dirname "$DATA")" && cp "$CARRIED_DATA" "$DATA.tmp" && mv "$DATA.tmp" "$DATA"
  fi
  [[ -f $DATA ]] || die "no CIFAR-10 archive at $DATA: run 'benchmarks/gpu_session.sh wheels' here and carry .data"
}
summary() { helper summary --results "$STATE" || true; }
publish() {  # the stage's JSON files into the results folder
  mkdir -p "$RESULTS"
  local f
  for f in "$STATE"/*.json; do
    [[ -f $f && $f != *.state.json ]] || continue
    [[ $(cd "$(dirname "$f")" && pwd) == $(cd "$RESULTS" && pwd) ]] && continue
    cp "$f" "$RESULTS/"
  done
}
stamp() { helper annotate "$1" --environment --set "session_command=benchmarks/gpu_session.sh $STAGE${2:+ ($2)}"; }

# --- wheels (here) -------------------------------------------------------------------------------------------
stage_wheels() {
  [[ $SMOKE == 1 ]] && { say 'smoke: nothing to download'; return; }
  local src=${SHARED_DATA:-../shared/data/cifar10-jpeg.tar.gz}
  for p in .whl .data .runs; do
    git check-ignore -q "$p/x" || die "$p/ is not ignored by git: add it to .gitignore (carried paths must be ignored)"
  done
  rm -rf .whl && mkdir -p .whl .data
  # robustbench 1.1.1's `import robustbench.eval` (through our adapter) needs robustbench, pyautoattack, gdown,
  # geotorch and beautifulsoup4 beyond the device image; timm 1.0.31 is the version CI tests.
  "$PY" -m pip download -q --no-deps --disable-pip-version-check --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  # pyautoattack's wheel carries a 45 MB example model that nothing imports: dropped to fit the carry limit
  helper slim-wheel .whl/pyautoattack-*.whl --drop 'pyautoattack/examples/*.pt' --drop 'pyautoattack/examples/*.h5'
  [[ -f $src ]] || die "no CIFAR-10 archive at $src (set SHARED_DATA)"
  rm -f .data/cifar10-jpeg.tar.gz && cp --no-preserve=mode "$src" .data/cifar10-jpeg.tar.gz
  echo "$DATA_SHA256  .data/cifar10-jpeg.tar.gz" | sha256sum -c --quiet - || die '.data/cifar10-jpeg.tar.gz: wrong sha256'
  local extra
  extra=$(find .data -mindepth 1 -not -name cifar10-jpeg.tar.gz | head -5)
  [[ -z $extra ]] || die ".data/ holds more than the archive ($extra ...): remove it, it would be carried"
  local mib
  mib=$(( ($(du -sb .whl .data | awk '{s+=$1} END {print s}') + (1 << 20) - 1) >> 20 ))
  ls -l .whl .data
  (( mib <= 60 )) || die ".whl + .data are $mib MiB; the carry limit is 64 MiB with the working tree"
  say "ready: .whl (${#WHEELS[@]} wheels) and .data, $mib MiB to carry: carry [\".whl\", \".data\"]"
}

# --- setup (device) ------------------------------------------------------------------------------------------
stage_setup() {
  mkdir -p "$STATE" "$LOGS"
  if [[ -f $STATE/setup.json && -z ${FORCE_SETUP:-} ]]; then say "set up already ($STATE/setup.json; FORCE_SETUP=1 redoes it)"; return 0; fi
  if [[ $SMOKE == 1 ]]; then
    say 'smoke: no installs, the current environment'
  else
    compgen -G '.whl/*.whl' >/dev/null || die '.whl/ holds no wheels: run the wheels stage here and carry .whl'
    "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
    # python -m from the repository root imports the package anyway; the editable install adds its metadata
    "$PY" -m pip install -q --root-user-action=ignore --no-deps --no-build-isolation -e . \
      || say 'WARNING: editable install failed; running the package from the source tree (python -m ...)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit \
      --format=csv || true
  fi
  need_data
  # the trainer and the evaluation read the .tar.gz directly; this decodes it once into the cache
  helper environment --data "$DATA" --out "$STATE/setup.json" 2>>"$LOGS/setup.log"
  stamp "$STATE/setup.json"
  "$PY" -c 'import robust_resnets.evaluation.robustbench_adapter as a; a.install(); import robustbench.eval' \
    2>>"$LOGS/setup.log" && say 'robustbench.eval imports' || say 'WARNING: robustbench.eval does not import: the AutoAttack comparison will be skipped'
}

# --- train (device) ------------------------------------------------------------------------------------------
train_sets() { local s; for s in "${TRAIN_SETS[@]}" "data.root=$DATA"; do printf -- '--set\n%s\n' "$s"; done; }

launch_run() {  # MODEL WINDOW_S: start or resume one run for at most WINDOW_S seconds
  local m=$1 window=$2 dir=$RUNS/$1 log=$LOGS/train_$1.log plan=$STATE/train_plan.json epochs args out max ckpt
  if [[ -f $dir/model.safetensors ]]; then say "$m: finished"; return 0; fi
  epochs=$(helper get "$plan" epochs)
  if [[ -f $dir/last.pt ]]; then
    args=(--out "$dir" --resume)
  else
    if [[ -e $dir ]]; then say "$m: $dir has no last.pt (stopped before its first checkpoint): starting again"; rm -rf "$dir"; fi
    args=(--config "$RECIPE" --out "$dir" --set "model.name=$m" --set "model.kwargs=$KW" --set "run.epochs=$epochs"
          --set "description=PGD-AT $m, $epochs epochs ($RECIPE recipe, model replaced)"
          --set run.progress=false)
    mapfile -t -O ${#args[@]} args < <(train_sets)
  fi
  out=$(helper max-steps --run "$dir" --plan "$plan" --model "$m" --seconds $(( window - STARTUP_S )) \
    ${STEPS_PER_CALL:+--cap "$STEPS_PER_CALL"})
  read -r max ckpt <<<"$out"
  args+=(--set "run.max_steps=$max" --set "run.checkpoint_every=$ckpt")
  say "$m: training to step $max of $(helper get "$plan" total_steps) (checkpoint every $ckpt steps), window ${window}s"
  local rc=0
  timeout --signal=TERM --kill-after=20 "$window" "$PY" -m robust_resnets.train "${args[@]}" >>"$log" 2>&1 || rc=$?
  tail -n 2 "$log" | sed "s/^/  $m: /"
  if (( rc == 124 || rc == 137 )); then say "$m: stopped by the window's end; it resumes from last.pt next time"
  elif (( rc != 0 )); then say "$m: training failed (exit $rc), see $log"; fi
  return 0
}

stage_train() {
  need_data
  mkdir -p "$STATE" "$LOGS"
  local plan=$STATE/train_plan.json m pids=() sets
  mapfile -t sets < <(train_sets)
  if [[ ! -f $plan ]]; then
    say "probing training speed of $MODELS (alone, then together)"
    helper probe --models "$MODELS" --recipe "$RECIPE" "${sets[@]}" --model-kwargs "$KW" --steps "$PROBE_STEPS" \
      --out "$STATE/probe_alone.json" 2>&1 | grep -v '^\s*$' | tail -n 4
    # together: each model's probe epochs last about TOGETHER_EPOCH_S (when alone), long beside the processes'
    # start-up skew, so the two timed epochs of each run while the other model trains too
    local steps img bs
    for m in ${MODELS//,/ }; do
      img=$(printf '%.0f' "$(helper get "$STATE/probe_alone.json" "rows.$m.img_s")")
      bs=$(helper get "$STATE/probe_alone.json" "rows.$m.batch_size")
      steps=$(( (TOGETHER_EPOCH_S * img + bs - 1) / bs ))
      (( steps >= PROBE_STEPS )) || steps=$PROBE_STEPS
      helper probe --models "$m" --recipe "$RECIPE" "${sets[@]}" --model-kwargs "$KW" --steps "$steps" \
        --out "$STATE/probe_together_$m.json" >"$LOGS/probe_together_$m.log" 2>&1 &
      pids+=($!)
    done
    local rc=0 p
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    (( rc == 0 )) || { tail -n 20 "$LOGS"/probe_together_*.log; die "a concurrent probe failed (exit $rc)"; }
    local together=()
    for m in ${MODELS//,/ }; do together+=("$STATE/probe_together_$m.json"); done
    helper plan --alone "$STATE/probe_alone.json" --together "${together[@]}" --recipe "$RECIPE" "${sets[@]}" \
      --budget-s "$TRAIN_BUDGET_S" --overhead-s "$OVERHEAD_S" --max-epochs "$MAX_EPOCHS" \
      --mode "${TRAIN_MODE:-auto}" --out "$plan"
    stamp "$plan" 'probe and plan'
  else
    say "plan: $(helper get "$plan" mode), $(helper get "$plan" epochs) epochs (from $plan)"
  fi
  if [[ $(helper get "$plan" mode) == concurrent ]]; then
    local window; window=$(remaining)
    if (( window < STARTUP_S + 30 )); then say "no time left in this call (${window}s) to train: run train again"; return 0; fi
    pids=()
    for m in ${MODELS//,/ }; do launch_run "$m" "$window" & pids+=($!); done
    for p in "${pids[@]}"; do wait "$p" || true; done
  else
    for m in ${MODELS//,/ }; do
      local window; window=$(remaining)
      if (( window < STARTUP_S + 30 )); then say "$m: no time left in this call (${window}s): run train again"; break; fi
      launch_run "$m" "$window"
    done
  fi
  helper status --runs "$RUNS" --models "$MODELS" --out "$STATE/train_status.json"
  stamp "$STATE/train_status.json"
}

# --- evaluate (device) ---------------------------------------------------------------------------------------
ship() {  # MODEL: prints the weights file to evaluate: the run's weights as the package ships them (fp16)
  local m=$1 dir=$RUNS/ship/$1.cifar10
  # smoke models are tiny and fit no manifest entry: their run's own file stands in
  if [[ $SMOKE == 1 ]]; then echo "$RUNS/$m/model.safetensors"; return 0; fi
  if [[ ! -f $dir/model.safetensors ]]; then
    if ! "$PY" -m robust_resnets convert "$RUNS/$m/model.safetensors" --to "$m.cifar10" --dtype float16 \
        --out "$dir" --overwrite >>"$LOGS/ship_$m.log" 2>&1; then
      tail -n 5 "$LOGS/ship_$m.log" >&2
      return 1
    fi
    # conversions are byte-reproducible: converting the returned fp32 run here must give this sha256
    printf '{"model": "%s.cifar10", "sha256": "%s", "size": %s}\n' "$m" \
      "$(sha256sum "$dir/model.safetensors" | cut -d' ' -f1)" "$(stat -c %s "$dir/model.safetensors")" \
      >"$STATE/ship_$m.json"
  fi
  echo "$dir/model.safetensors"
}

stage_evaluate() {
  need_data
  mkdir -p "$STATE" "$LOGS"
  local m evals=() f rc window
  for m in ${MODELS//,/ }; do
    f=$STATE/eval_$m.json
    if [[ -f $f ]]; then evals+=("$f"); continue; fi
    if [[ ! -f $RUNS/$m/model.safetensors ]]; then say "$m: not trained (yet); run train first"; continue; fi
    window=$(remaining)
    (( window >= 30 )) || { say "no time left to evaluate $m (${window}s): run evaluate again (it resumes)"; break; }
    local shipped name=$m
    if ! shipped=$(ship "$m"); then say "$m: converting it to fp16 failed (see $LOGS/ship_$m.log): not evaluated"; continue; fi
    [[ $SMOKE == 1 ]] || name=$m.cifar10
    say "$name: robust-resnets eval --attacks $EVAL_ATTACKS --n-examples $N_EXAMPLES on $shipped (window ${window}s)"
    rc=0
    timeout --signal=TERM --kill-after=20 "$window" "$PY" -m robust_resnets eval "$name" \
      --checkpoint "$shipped" --attacks "$EVAL_ATTACKS" --n-examples "$N_EXAMPLES" \
      --data-dir "$DATA" --device "$DEVICE" --out "$f" --quiet >>"$LOGS/eval_$m.log" 2>&1 || rc=$?
    tail -n 8 "$LOGS/eval_$m.log"
    if [[ -f $f ]]; then stamp "$f" "$m"; evals+=("$f")
    else say "$m: evaluation unfinished (exit $rc); run evaluate again: it resumes from $f.state.json"; fi
  done
  local n_models; n_models=$(wc -w <<<"${MODELS//,/ }")
  if (( ${#evals[@]} < n_models )); then
    say "${#evals[@]} of $n_models models evaluated: the precision check and the AutoAttack comparison wait for all"
    return 0
  fi
  local best; best=$(helper best "${evals[@]}")
  local weights
  weights=$(ship "$best") || { say "$best: converting it to fp16 failed (see $LOGS/ship_$best.log)"; return 0; }
  say "better model: $best"
  f=$STATE/precision.json
  window=$(remaining)
  if [[ ! -f $f ]] && (( window >= 30 )); then
    timeout --signal=TERM --kill-after=20 "$window" "$PY" -m benchmarks speed precision --model "$best" \
      --weights "$weights" --data-dir "$DATA" --n-examples "$N_EXAMPLES" --attacks "$PRECISION_ATTACKS" \
      --device "$DEVICE" --model-kwargs "$KW" --out "$f" 2>&1 | tee -a "$LOGS/precision.log" | tail -n 5 || true
    if [[ -f $f ]]; then helper annotate "$f" --set "model=$best" --set "weights=$weights"; fi
  fi
  f=$STATE/autoattack.json
  window=$(remaining)
  if [[ ! -f $f ]] && (( window >= 30 )); then
    if "$PY" -c 'import robust_resnets.evaluation.robustbench_adapter as a; a.install(); import robustbench.eval' 2>/dev/null; then
      timeout --signal=TERM --kill-after=20 "$window" "$PY" -m benchmarks speed autoattack --model "$best" \
        --weights "$weights" --data-dir "$DATA" --n-examples "$AA_N" --device "$DEVICE" --model-kwargs "$KW" \
        --out "$f" 2>&1 | tee -a "$LOGS/autoattack.log" | tail -n 4 || true
      if [[ -f $f ]]; then helper annotate "$f" --set "model=$best" --set "weights=$weights" --set "note=issue 8 \
names wrn_28_10, whose weights cannot reach the offline device and whose random initialisation makes AutoAttack \
trivial; this comparison uses the better model trained in this session"; fi
    else
      printf '{"skipped": "robustbench.eval does not import here (install the robustbench wheels)", "model": "%s"}\n' \
        "$best" >"$f"
      stamp "$f"
    fi
  fi
}

# --- speed (device) ------------------------------------------------------------------------------------------
run_speed() {  # WHAT FILE ARGS...: one speed benchmark unless its JSON exists
  local what=$1 f=$STATE/$2 window; shift 2
  [[ -f $f ]] && { say "$(basename "$f"): done"; return 0; }
  window=$(remaining)
  (( window >= 30 )) || { say "no time left for $(basename "$f") (${window}s): run speed again"; return 0; }
  timeout --signal=TERM --kill-after=20 "$window" "$PY" -m benchmarks speed "$what" --device "$DEVICE" \
    --model-kwargs "$KW" --out "$f" "$@" 2>&1 | tee -a "$LOGS/speed_$what.log" | grep -v '^\s*$' | tail -n 12 || true
  collect_results
}

stage_speed() {
  mkdir -p "$STATE" "$LOGS"
  run_speed matmul speed_matmul.json "${MATMUL[@]}"
  local peak=() m part
  if [[ -f $STATE/speed_matmul.json ]]; then
    peak=(--peak-tflops "$(helper get "$STATE/speed_matmul.json" bf16_matmul_tflops)")
  fi
  for m in ${TRAIN_SPEED_MODELS//,/ }; do
    run_speed train "speed_train_$m.json" --models "$m" "${TRAIN_SPEED[@]}" "${peak[@]}"
  done
  for part in "${THROUGHPUT_PARTS[@]}"; do
    run_speed throughput "speed_throughput_${part%%:*}.json" --models "${part#*:}" "${THROUGHPUT[@]}"
  done
}

# --- collect -------------------------------------------------------------------------------------------------
collect_results() {  # every JSON, log and run record (a few hundred kB) into $OUT/results.tar.gz
  local dest=${OUT:-$RUNS/collect} tmp m f files=()
  mkdir -p "$dest" "$STATE"
  publish
  tmp=$(mktemp -d "$RUNS/.collect.XXXXXX")
  for m in ${MODELS//,/ }; do
    for f in metrics.jsonl train_config.yaml config.json; do
      if [[ -f $RUNS/$m/$f ]]; then files+=("$m/$f"); fi
    done
  done
  tar czf "$tmp/results.tar.gz" -C "$RUNS" results "${files[@]}"
  mv "$tmp/results.tar.gz" "$dest/results.tar.gz"
  rm -rf "$tmp"
}

stage_collect() {
  local dest=${OUT:-$RUNS/collect} tmp m files=()
  collect_results
  # the finished runs' fp32 weights and records (about 42 MB for the two models), split below the 16 MiB a
  # returned file may have; their fp16 copies are re-made here byte for byte (ship_<model>.json has the sha256)
  for m in ${MODELS//,/ }; do
    if [[ -f $RUNS/$m/model.safetensors ]]; then
      files+=("$m/model.safetensors" "$m/config.json" "$m/metrics.jsonl" "$m/train_config.yaml")
    fi
  done
  rm -f "$dest"/models.tar.gz.part-*
  if (( ${#files[@]} )); then
    tmp=$(mktemp -d "$RUNS/.collect.XXXXXX")
    tar cf - -C "$RUNS" "${files[@]}" | gzip -1 >"$tmp/models.tar.gz"
    split -b 15m -d -a 1 "$tmp/models.tar.gz" "$tmp/models.tar.gz.part-"
    mv "$tmp"/models.tar.gz.part-* "$dest/"
    rm -rf "$tmp"
  fi
  say "collected into $dest: $(cd "$dest" && ls | tr '\n' ' ')"
  say "unpack: tar xzf results.tar.gz; cat models.tar.gz.part-* | tar xzf -"
}

on_exit() {  # a stage that failed still returns what the call produced
  local rc=$?
  if (( rc != 0 )) && [[ ${STAGE:-} =~ ^(setup|train|evaluate|speed)$ ]]; then
    trap - EXIT
    say "stage $STAGE failed (exit $rc): collecting what there is"
    stage_collect || true
    summary
  fi
  exit "$rc"
}
trap on_exit EXIT

stage_chain() { run_stage setup; run_stage train; run_stage train; run_stage evaluate; run_stage speed; }

run_stage() {
  STAGE=$1
  export GPU_SESSION_COMMAND="benchmarks/gpu_session.sh $1"
  say "stage $1 (smoke=$SMOKE, $(remaining)s left in this call)"
  case $1 in
    wheels) stage_wheels; return ;;
    setup) stage_setup ;;
    train) stage_train ;;
    evaluate) stage_evaluate ;;
    speed) stage_speed ;;
    collect) stage_collect; summary; return ;;
    chain) stage_chain; return ;;
    *) die "unknown stage '$1': use wheels, setup, train, evaluate, speed, collect or chain" ;;
  esac
  stage_collect
  summary
}

(( $# )) || die 'usage: benchmarks/gpu_session.sh STAGE [STAGE ...] (wheels, setup, train, evaluate, speed, collect, chain)'
for stage in "$@"; do run_stage "$stage"; done
