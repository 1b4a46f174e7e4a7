# Sourced by slurm/*.sbatch. It decides where processes run (one launcher per node under srun),
# forwards the preemption signal, and requeues the job when training asked for it. It never
# decides what training does: that is the recipe.
#
# Environment (all optional; export before sbatch, or set in the template):
#   ACCELERATE_CONFIG        accelerate config (default configs/accelerate/multi_gpu.yaml); a DeepSpeed
#                            JSON here is the same as --deepspeed
#   --deepspeed X.json       (first argument of the template) train with this DeepSpeed config, as
#                            train.deepspeed=X.json (relative to the submit folder); checked, with
#                            deepspeed's presence, before srun
#   QLORA_SFT_GPUS_PER_NODE  processes per node (default: the GPUs SLURM gave the job on each node)
#   QLORA_SFT_PROCS_PER_NODE processes per node when the job has no GPUs (CPU ranks over gloo; default 1)
#   QLORA_SFT_PYTHON         python with qlora-sft installed (default: python on PATH)
#   MASTER_PORT              rendezvous port (default 20000 + job id mod 20000)
#   QLORA_SFT_SHUTDOWN_GRACE seconds the launcher waits for ranks to save before killing them (default 300)
#   QLORA_SFT_PREPARE=0      skip `qlora-sft prepare` before the ranks start (default: prepare once
#                            here, on the batch host, so no rank tokenizes while the others wait)
#   QLORA_SFT_DRY_RUN=1      print what would run instead of running it
#   NCCL_*, TORCH_*          passed through; defaults below only fill what you did not set

qlora_sft_log() { echo "[qlora-sft slurm $(date +%H:%M:%S)] $*" >&2; }

# QLORA_SFT_DRY_RUN as qlora-sft reads every switch: 1/true/yes on, unset/empty/0/false/no off;
# anything else stops the job before it starts anything
qlora_sft_dry_run() {
  local value
  value="$(printf '%s' "${QLORA_SFT_DRY_RUN:-}" | tr '[:upper:]' '[:lower:]' | tr -d '[:space:]')"
  case "$value" in
    "" | 0 | false | no) return 1 ;;
    1 | true | yes) return 0 ;;
    *)
      qlora_sft_log "error: QLORA_SFT_DRY_RUN=${QLORA_SFT_DRY_RUN}: use 1 (on) or 0 (off), or leave it unset"
      exit 2
      ;;
  esac
}

qlora_sft_gpus_on_node() {
  # SLURM_GPUS_ON_NODE is set when the job asked for GPUs; otherwise count what is visible.
  if [ -n "${QLORA_SFT_GPUS_PER_NODE:-}" ]; then echo "$QLORA_SFT_GPUS_PER_NODE"; return; fi
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  # (grep -c prints 0 itself when nothing matches; it then exits 1)
  if command -v nvidia-smi >/dev/null 2>&1; then { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true; return; fi
  echo 0
}

qlora_sft_check_count() {
  # NAME VALUE LEAST WHAT: VALUE must be a whole number >= LEAST (bash's `-gt` on a word fails and
  # reads as false: GPUs per node "eight" had the job run CPU ranks on its GPU nodes).
  case "$2" in
    '' | *[!0-9]*) ;;
    *) if [ "$((10#$2))" -ge "$3" ]; then return 0; fi ;;
  esac
  qlora_sft_log "error: $1='$2' is not $4; fix or unset it. Not starting"
  return 2
}

qlora_sft_run() {
  qlora_sft_dry_run || true # (a value it cannot mean stops here, before anything runs)
  local deepspeed="" ds_flag=""
  case "${1:-}" in
    --deepspeed) ds_flag=1; deepspeed="${2:-}"; shift; [ $# -eq 0 ] || shift ;;
    --deepspeed=*) ds_flag=1; deepspeed="${1#--deepspeed=}"; shift ;;
  esac
  if [ -n "$ds_flag" ] && [ -z "$deepspeed" ]; then
    # (`--deepspeed=$DS` with DS unset would otherwise train without DeepSpeed)
    echo "usage: sbatch $0 [--deepspeed X.json] RECIPE [section.key=value ...]: --deepspeed is empty; name the DeepSpeed JSON" >&2
    return 2
  fi
  case "${ACCELERATE_CONFIG:-}" in
    *.json) deepspeed="${deepspeed:-$ACCELERATE_CONFIG}"; unset ACCELERATE_CONFIG ;;
  esac
  if [ $# -lt 1 ]; then
    echo "usage: sbatch $0 [--deepspeed X.json] RECIPE [section.key=value ...]" >&2
    return 2
  fi
  local recipe="$1"
  shift
  local home="${QLORA_SFT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
  local py="${QLORA_SFT_PYTHON:-$(command -v python || command -v python3)}"
  if [ -n "$deepspeed" ]; then
    # a DeepSpeed JSON is a recipe key for every rank (train.deepspeed), checked once here
    local ds_file
    ds_file="$("$py" -m qlora_sft.launch_config deepspeed "$deepspeed")" || return 2
    set -- "$@" "train.deepspeed=$ds_file"
  fi
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local job="${SLURM_JOB_ID:-0}"
  local gpus procs gpus_from=QLORA_SFT_GPUS_PER_NODE
  [ -n "${QLORA_SFT_GPUS_PER_NODE:-}" ] || gpus_from=SLURM_GPUS_ON_NODE
  [ -n "${QLORA_SFT_GPUS_PER_NODE:-}${SLURM_GPUS_ON_NODE:-}" ] || gpus_from="the GPU count of nvidia-smi -L"
  gpus="$(qlora_sft_gpus_on_node)"
  qlora_sft_check_count "$gpus_from" "$gpus" 0 "a whole number of GPUs per node (0: CPU ranks)" || return 2
  gpus=$((10#$gpus))
  if [ "$gpus" -gt 0 ]; then
    procs="$gpus"
  else
    procs="${QLORA_SFT_PROCS_PER_NODE:-1}"
    qlora_sft_check_count QLORA_SFT_PROCS_PER_NODE "$procs" 1 "a whole number of processes per node, 1 or more" || return 2
    procs=$((10#$procs))
    export ACCELERATE_USE_CPU=true
  fi
  if [ -n "${MASTER_PORT:-}" ]; then
    qlora_sft_check_count MASTER_PORT "$MASTER_PORT" 1 "a TCP port (1-65535)" || return 2
    if [ "$((10#$MASTER_PORT))" -gt 65535 ]; then
      qlora_sft_log "error: MASTER_PORT='$MASTER_PORT' is not a TCP port (1-65535); fix or unset it. Not starting"
      return 2
    fi
  fi
  local total=$((nodes * procs))
  local master_addr
  master_addr="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)}"
  if [ -z "$master_addr" ]; then
    # Never fall back to localhost: on several nodes every node would rendezvous with itself.
    qlora_sft_log "error: cannot find the first node of the job (SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'); set MASTER_ADDR"
    return 2
  fi
  export MASTER_ADDR="$master_addr"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + job % 20000))}"
  export QLORA_SFT_ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$home/configs/accelerate/multi_gpu.yaml}"
  # a DeepSpeed file the accelerate config names relative to its own folder, as an absolute path
  local extra
  extra="$("$py" -m qlora_sft.launch_config accelerate-args "$QLORA_SFT_ACCELERATE_CONFIG")" || return 2
  if [ -n "$extra" ]; then export QLORA_SFT_DEEPSPEED_CONFIG_FILE="$(printf '%s\n' "$extra" | sed -n 2p)"; fi
  export QLORA_SFT_NUM_PROCESSES="$total"
  export QLORA_SFT_NUM_MACHINES="$nodes"
  export QLORA_SFT_PY="$py"
  # Cluster defaults (yours win): unbuffered logs, NCCL errors raised instead of hangs, and the
  # launcher forwards USR1 to the ranks (torchrun forwards only TERM/INT/HUP/QUIT by default).
  export PYTHONUNBUFFERED=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$procs} / procs > 0 ? ${SLURM_CPUS_PER_TASK:-$procs} / procs : 1 ))}"
  # (torchrun's --signals-to-handle / --shutdown-timeout, read from PET_* by torchrun and accelerate)
  export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-${QLORA_SFT_SHUTDOWN_GRACE:-300}}"

  qlora_sft_log "job $job restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $procs process(es) = $total;" \
    "rendezvous $MASTER_ADDR:$MASTER_PORT; recipe $recipe $*"

  local run_dir
  if ! run_dir="$("$py" -m qlora_sft plan "$recipe" "$@" --run-dir)"; then
    qlora_sft_log "error: the recipe does not validate (see above); not starting"
    return 2
  fi

  # Tokenize once, here, with this step's CPUs; the ranks then find the cache (a cache built before,
  # e.g. by `qlora-sft prepare` on a login node or by the job's previous run, is reused in seconds).
  local prepare=("$py" -m qlora_sft prepare "$recipe" "$@")
  if [ "${QLORA_SFT_PREPARE:-1}" != 0 ] && ! qlora_sft_dry_run; then
    if ! "${prepare[@]}"; then
      qlora_sft_log "error: preparing the data failed (see above); not starting"
      return 2
    fi
  fi

  # One task per node. Per-task values ($SLURM_NODEID) stay quoted here and are expanded by each
  # task's own shell; the recipe and overrides travel as arguments, never through a shell string.
  local task
  if [ "$total" -eq 1 ]; then
    task='exec "$QLORA_SFT_PY" -m qlora_sft train "$@"'
  else
    task='exec "$QLORA_SFT_PY" -m accelerate.commands.launch --config_file "$QLORA_SFT_ACCELERATE_CONFIG"'
    task+=' --num_machines "$QLORA_SFT_NUM_MACHINES" --machine_rank "$SLURM_NODEID" --num_processes "$QLORA_SFT_NUM_PROCESSES"'
    task+=' --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" --rdzv_backend static'
    [ "${ACCELERATE_USE_CPU:-}" = true ] && task+=' --mixed_precision no'
    [ -n "${QLORA_SFT_DEEPSPEED_CONFIG_FILE:-}" ] && task+=' --deepspeed_config_file "$QLORA_SFT_DEEPSPEED_CONFIG_FILE"'
    task+=' -m qlora_sft train "$@"'
  fi
  local cmd=(srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$task" qlora-sft "$recipe" "$@")
  if qlora_sft_dry_run; then
    printf 'run_dir=%s\n' "$run_dir"
    if [ "${QLORA_SFT_PREPARE:-1}" != 0 ]; then printf 'prepare: '; printf '%q ' "${prepare[@]}"; printf '\n'; fi
    printf 'env MASTER_ADDR=%s MASTER_PORT=%s QLORA_SFT_NUM_PROCESSES=%s\n' "$MASTER_ADDR" "$MASTER_PORT" "$total"
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi

  local signalled=""
  "${cmd[@]}" &
  local srun_pid=$!
  # SLURM sends USR1 (--signal=B:USR1@grace) to this shell only: pass it on; srun forwards it to
  # each node's launcher, which forwards it to the ranks; they save at the next step and exit 75.
  trap 'signalled=USR1; qlora_sft_log "got USR1: asking the ranks to save and stop"; kill -USR1 "$srun_pid" 2>/dev/null || true' USR1
  trap 'signalled=TERM; qlora_sft_log "got TERM: asking the ranks to save and stop"; kill -USR1 "$srun_pid" 2>/dev/null || true' TERM
  # A trap interrupts `wait` (status above 128) while srun still runs: wait again until it exits,
  # then once more for its real exit status (bash keeps it for an exited child).
  while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid" 2>/dev/null || true
  done
  local rc=0
  wait "$srun_pid" || rc=$?
  trap - USR1 TERM
  if [ -f "$run_dir/PREEMPTED" ] || [ "$rc" -eq 75 ]; then
    qlora_sft_log "training saved a checkpoint and asked to be requeued (exit $rc${signalled:+, after $signalled}): requeueing job $job"
    scontrol requeue "$job"
    return 0
  fi
  if [ "$rc" -ne 0 ]; then
    qlora_sft_log "training failed (exit $rc); not requeueing"
  else
    qlora_sft_log "training finished; run directory $run_dir"
  fi
  return "$rc"
}
