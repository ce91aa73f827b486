#!/usr/bin/env bash
# Structures benchmark: run configs/structures_<name>.yaml for each dataset and
# write eval/results/structures_<name>/ (CSV, *_pareto.csv, two-panel PNG, RUN_INFO.txt).
#
# Usage:  eval/run_structures.sh [minilm] [npm] [glove]        (default: all three)
# Env:    DATA_DIR  directory holding the HDF5 files (default: data)
#         PYTHON    interpreter with ipq_index installed (default: python)
#         COMMIT    run the ipq_index code of this git commit (e.g. HEAD), exported
#                   to a temporary directory, instead of the working tree: pins the
#                   measured code while the tree is being edited
# Example: nice -n 10 env DATA_DIR=/data PYTHON=.venv/bin/python COMMIT=HEAD eval/run_structures.sh minilm npm
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)
DATA_DIR=${DATA_DIR:-data}
PYTHON=${PYTHON:-python}
declare -A FILES=(
  [minilm]=pypi-paraphrase-minilm-l3-384-raw-dot.hdf5
  [npm]=npm-minilm-l6-384-normed-dot.hdf5
  [glove]=glove-6b-50-raw-dot.hdf5
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(minilm npm glove)
for name in "${names[@]}"; do
  if [ -z "${FILES[$name]+x}" ]; then
    echo "unknown dataset '$name' (expected: ${!FILES[*]})" >&2; exit 2
  fi
  if [ ! -f "$DATA_DIR/${FILES[$name]}" ]; then
    echo "missing $DATA_DIR/${FILES[$name]} (set DATA_DIR)" >&2; exit 2
  fi
done

DATA_DIR=$(cd "$DATA_DIR" && pwd)
code="working tree $(git describe --always --dirty 2>/dev/null || echo '(no git)')"
run_dir=$root
if [ -n "${COMMIT:-}" ]; then
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  git archive "$COMMIT" ipq_index | tar -x -C "$src"
  export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
  code="commit $(git rev-parse "$COMMIT")"
  run_dir=$src  # python -m puts the working directory first on sys.path
fi

for name in "${names[@]}"; do
  out=eval/results/structures_$name
  mkdir -p "$out"
  {
    echo "code: $code"
    echo "ipq_index imported from: $(cd "$run_dir" && "$PYTHON" -c 'import ipq_index, os; print(os.path.dirname(ipq_index.__file__))')"
    echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm), $(nproc) cores"
    echo "command: ipq bench --config configs/structures_$name.yaml --dataset $DATA_DIR/${FILES[$name]} --out $out"
  } > "$out/RUN_INFO.txt"
  (cd "$run_dir" && "$PYTHON" -m ipq_index.cli bench --config "$root/configs/structures_$name.yaml" \
    --dataset "$DATA_DIR/${FILES[$name]}" --out "$root/$out")
  echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$out/RUN_INFO.txt"
done
