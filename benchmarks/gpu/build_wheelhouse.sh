#!/usr/bin/env bash
# Builds .wheelhouse/ (git-ignored) for benchmarks/gpu/run.sh, here, where PyPI can be reached: the
# wheels of benchmarks/gpu/wheelhouse.txt for the GPU machine's CPython 3.12 on x86-64 Linux, and the
# Fashion-MNIST files the GPU checks read (.wheelhouse/fashion-mnist/). It checks that every
# requirement of every wheel is met by another wheel or by a package the machine has, prints the
# total size, and fails above 60 MiB: the device tool carries at most 64 MiB of the working tree.
#
#   bash benchmarks/gpu/build_wheelhouse.sh      (PYTHON: an interpreter with pip, packaging and torch;
#                                                 default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.wheelhouse
LIMIT_MIB=60
FASHION_MNIST=${CVAE_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

rm -rf "$OUT"
mkdir -p "$OUT"
# The exact pins, one per line, for pip (wheelhouse.txt also names what is deliberately not carried).
pins=$(grep -Eo '^[A-Za-z0-9._-]+==[^ #]+' benchmarks/gpu/wheelhouse.txt)
platforms=()
for tag in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# shellcheck disable=SC2086  # one argument per pin
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --dest "$OUT" $pins
"$PYTHON" -m benchmarks.gpu.wheelhouse check "$OUT"
"$PYTHON" -m benchmarks.gpu.wheelhouse data "$FASHION_MNIST" "$OUT/fashion-mnist"

wheels=$(cat "$OUT"/*.whl | wc -c)
data=$(cat "$OUT"/fashion-mnist/* | wc -c)
total=$((wheels + data))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "$OUT: $(ls "$OUT"/*.whl | wc -l) wheels $(mib "$wheels"), Fashion-MNIST $(mib "$data"), total $(mib "$total") (limit $LIMIT_MIB MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: $OUT is $(mib "$total"), over $LIMIT_MIB MiB: the device tool carries at most 64 MiB with the repository" >&2
  exit 1
fi
