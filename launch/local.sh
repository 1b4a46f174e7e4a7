#!/usr/bin/env bash
# Train on this machine with accelerate: one process per visible GPU (DDP), or one process on the
# GPU or the CPU.
#
#   launch/local.sh RECIPE [section.key=value ...]
#   ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml launch/local.sh RECIPE
#   launch/local.sh --deepspeed zero3_bf16.json RECIPE      (your own DeepSpeed JSON; or ACCELERATE_CONFIG=X.json)
#
# `--deepspeed X.json` trains with that DeepSpeed config, as `train.deepspeed=X.json` (relative to the
# working directory); it is checked, with deepspeed's presence, before any process starts.
#
# Environment: ACCELERATE_CONFIG (an accelerate config file; default: single_gpu.yaml or
# multi_gpu.yaml by GPU count), NUM_GPUS (default: the visible GPU count), ACCELERATE (the
# accelerate executable). Run it from the folder your recipe's relative paths start from.
set -euo pipefail
deepspeed=""
ds_flag=""
case "${1:-}" in
  --deepspeed) ds_flag=1; deepspeed="${2:-}"; shift; [ $# -eq 0 ] || shift ;;
  --deepspeed=*) ds_flag=1; deepspeed="${1#--deepspeed=}"; shift ;;
esac
if [ -n "$ds_flag" ] && [ -z "$deepspeed" ]; then
  # (`--deepspeed=$DS` with DS unset would otherwise train without DeepSpeed)
  echo "usage: $0 [--deepspeed X.json] RECIPE [section.key=value ...]: --deepspeed is empty; name the DeepSpeed JSON" >&2
  exit 2
fi
case "${ACCELERATE_CONFIG:-}" in
  *.json)
    if [ -n "$deepspeed" ]; then echo "$0: ACCELERATE_CONFIG and --deepspeed both name a DeepSpeed JSON; give one" >&2; exit 2; fi
    deepspeed="$ACCELERATE_CONFIG"; unset ACCELERATE_CONFIG ;;
esac
if [ $# -lt 1 ]; then
  echo "usage: $0 [--deepspeed X.json] RECIPE [section.key=value ...]" >&2
  exit 2
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
accelerate_bin="${ACCELERATE:-accelerate}"
if ! command -v "$accelerate_bin" >/dev/null 2>&1 && [ -x "$root/.venv/bin/accelerate" ]; then
  accelerate_bin="$root/.venv/bin/accelerate"
fi
python_bin="$(dirname "$(command -v "$accelerate_bin")")/python"
[ -x "$python_bin" ] || python_bin=python3
gpus="${NUM_GPUS:-$("$python_bin" -c 'import torch; print(torch.cuda.device_count())')}"
case "$gpus" in
  '' | *[!0-9]*)
    # (a word fails bash's -gt and read as false: NUM_GPUS=two launched one process)
    echo "$0: NUM_GPUS='$gpus' is not a whole number of GPUs (0 or more); fix or unset it" >&2
    exit 2 ;;
esac
gpus=$((10#$gpus))
config="${ACCELERATE_CONFIG:-}"
if [ -z "$config" ]; then
  if [ "$gpus" -gt 1 ]; then config="$root/configs/accelerate/multi_gpu.yaml"; else config="$root/configs/accelerate/single_gpu.yaml"; fi
fi
# Let the launcher pass USR1 (the usual "save and stop" signal) on to the ranks, and give them time
# to save before it kills them (torchrun forwards only TERM/INT/HUP/QUIT by default).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-300}"
overrides=()
if [ -n "$deepspeed" ]; then
  ds_file="$("$python_bin" -m qlora_sft.launch_config deepspeed "$deepspeed")" || exit 2
  overrides+=("train.deepspeed=$ds_file")
fi
args=(--config_file "$config")
# a DeepSpeed file the accelerate config names relative to its own folder, as an absolute path
extra="$("$python_bin" -m qlora_sft.launch_config accelerate-args "$config")" || exit 2
if [ -n "$extra" ]; then mapfile -t extra_args <<<"$extra"; args+=("${extra_args[@]}"); fi
if [ "$gpus" -gt 1 ]; then args+=(--num_processes "$gpus"); fi
echo "launch/local.sh: $gpus GPU(s) -> $config${deepspeed:+ with DeepSpeed $deepspeed}" >&2
exec "$accelerate_bin" launch "${args[@]}" -m qlora_sft train "$@" ${overrides[@]+"${overrides[@]}"}
