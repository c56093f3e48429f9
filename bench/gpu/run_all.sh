#!/usr/bin/env bash
# hetrain's whole GPU programme in one command, for a machine with one NVIDIA GPU and no network:
# the GPU tests, hetrain against FSDP2 / ZeRO-Offload / ZeRO-3 offload, the offload engine against
# its lower bound, the predictor's table and the largest trainable model (bench/gpu/gpu_evidence.py
# says what each step does). Each step runs under its own time limit; results.json, results.md,
# log.txt and the plots land in the output folder.
#
#   bash bench/gpu/run_all.sh [--dry-run | --quick] [--out DIR] [--deadline-s S] [--steps NAME ...]
#
# --dry-run: every step on the CPU at tiny sizes (what CI runs, so the script cannot rot);
# --quick: every step on the GPU at small sizes (a smoke test, about two minutes);
# default: the full sizes, finishing within --deadline-s (470 s) of the start;
# --steps: only these steps, in this order (tests peers bound predictor capacity mixed).
#
# It installs nothing from the internet. It uses $PYTHON, else the python3 on the PATH when it
# has torch, else .venv/bin/python; hetrain runs from this checkout (src/ on PYTHONPATH). Missing packages
# travel as wheels in ./.whl (docs/gpu.md lists them: tomli-w for hetrain; DeepSpeed, built with
# DS_BUILD_OPS=0, and its pure-Python dependencies), installed into a scratch folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
mode=full
out=${OUT:-runs/gpu}
deadline=470
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) mode=dry ;;
    --quick) mode=quick ;;
    --out) out=$2; shift ;;
    --deadline-s) deadline=$2; shift ;;
    --steps) steps=(); while [ $# -gt 1 ] && [ "${2#--}" = "$2" ]; do steps+=("$2"); shift; done ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
start=$(date +%s)
py=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$py" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
  py=.venv/bin/python  # the README's environment
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
: > "$log"

if [ "$mode" != dry ] && compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d /tmp/hetrain-site.XXXX)
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl 2>&1 | tee -a "$log"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo/src:$repo/bench:$repo/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/hetrain-torch-extensions}

# DeepSpeed compiles its CPU Adam on first use (a minute of the CPU's time): build it now, in the
# background, while the GPU tests (which time nothing) run.
if [ "$mode" != dry ] && "$py" -c "import deepspeed" 2>/dev/null; then
  prebuild=$(mktemp /tmp/hetrain-deepspeed-build.XXXX)
  ( "$py" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
      > "$prebuild" 2>&1; echo "exit $?" >> "$prebuild" ) &
fi

elapsed=$(( $(date +%s) - start ))
"$py" bench/gpu/gpu_evidence.py --mode "$mode" --out "$out" --deadline-s $(( deadline - elapsed )) \
  ${prebuild:+--wait-file "$prebuild"} ${steps:+--steps "${steps[@]}"} 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
if [ -n "${prebuild:-}" ]; then
  { echo "--- DeepSpeed CPU Adam build (background) ---"; cat "$prebuild"; } >> "$log"
fi
echo "run_all.sh: exit $rc after $(( $(date +%s) - start )) s; results in $out" | tee -a "$log"
exit "$rc"
