#!/usr/bin/env bash
# Train on this machine with accelerate: one process per visible GPU (DDP), or one process on the
# GPU or the CPU.
#
#   launch/local.sh RECIPE [section.key=value ...]
#   ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero3.yaml launch/local.sh RECIPE
#
# Environment: ACCELERATE_CONFIG (an accelerate config file; default: single_gpu.yaml or
# multi_gpu.yaml by GPU count), NUM_GPUS (default: the visible GPU count), ACCELERATE (the
# accelerate executable). Run it from the folder your recipe's relative paths start from.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 RECIPE [section.key=value ...]" >&2
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
config="${ACCELERATE_CONFIG:-}"
if [ -z "$config" ]; then
  if [ "$gpus" -gt 1 ]; then config="$root/configs/accelerate/multi_gpu.yaml"; else config="$root/configs/accelerate/single_gpu.yaml"; fi
fi
# Let the launcher pass USR1 (the usual "save and stop" signal) on to the ranks, and give them time
# to save before it kills them (torchrun forwards only TERM/INT/HUP/QUIT by default).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export PET_SHUTDOWN_TIMEOUT="${PET_SHUTDOWN_TIMEOUT:-300}"
args=(--config_file "$config")
if [ "$gpus" -gt 1 ]; then args+=(--num_processes "$gpus"); fi
echo "launch/local.sh: $gpus GPU(s) -> $config" >&2
exec "$accelerate_bin" launch "${args[@]}" -m qlora_sft train "$@"
