#!/usr/bin/env bash
# Download, here, the wheels the GPU machine needs (Python 3.12, x86-64 Linux, no internet) into .whl/.
#
#   bench/fetch_gpu_wheels.sh                 # bench/gpu-wheels.txt: random-weight bench and tests/gpu
#   bench/fetch_gpu_wheels.sh --whole-jobs    # plus bench/gpu-wheels-whole-jobs.txt (PyAV)
#
# --no-deps: the lists name every dependency the machine lacks. pip matches manylinux tags exactly,
# so every tag a wheel may carry is listed. Then it prints each wheel's Requires-Dist, to check
# against what the machine has (bench/gpu-wheels.txt says what that is).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
lists=(-r bench/gpu-wheels.txt)
if [[ "${1:-}" == "--whole-jobs" ]]; then
    lists+=(-r bench/gpu-wheels-whole-jobs.txt)
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--whole-jobs]" >&2
    exit 2
fi
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${lists[@]}"
for wheel in .whl/*.whl; do
    echo "$(basename "$wheel"): $("$PYTHON" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
needs = [l[15:] for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist: ") and "extra ==" not in l]
print(", ".join(needs) or "no requirements")' "$wheel")"
done
