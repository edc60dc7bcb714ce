#!/usr/bin/env bash
# Download, here (PyPI reachable), the wheels that the GPU machine lacks, into .whl/ (ignored).
# The GPU machine has Python 3.12, PyTorch, transformers, accelerate, peft, timm, torchvision
# and ~200 more packages (tests/gpu/gpu_image.txt) and no network; run_gpu_checks.sh installs
# these wheels there with `pip install --no-index`. See tests/gpu/README.md.
#
#   bash tests/gpu/fetch_wheels.sh          # ~4 minutes; needs a CPython 3.12 here (PYTHON312=...)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=64

rm -rf "$DEST.new"
mkdir -p "$DEST.new"
echo "resolving what the GPU image lacks (pyproject.toml + liger-kernel, for CPython 3.12)..."
"$PY" tests/gpu/wheels.py plan --out "$DEST.new/plan.json"
echo "downloading (manylinux x86_64, CPython 3.12)..."
"$PY" tests/gpu/wheels.py fetch --plan "$DEST.new/plan.json" --dest "$DEST.new" 2>&1 |
    grep -v "^WARNING: Location" || true
"$PY" tests/gpu/wheels.py check --dest "$DEST.new"
rm -rf "$DEST"
mv "$DEST.new" "$DEST"

# What travels to the device: tracked files plus untracked files git does not ignore, plus .whl.
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl_bytes=$(du -cb "$DEST" | tail -1 | cut -f1)
total=$((tree_bytes + whl_bytes))
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $(du -sh "$DEST" | cut -f1) ($whl_bytes bytes)"
echo "working tree: $tree_bytes bytes; together $((total / 1048576)) MiB of $LIMIT_MIB MiB"
if ((total >= LIMIT_MIB * 1048576)); then
    echo "error: working tree + wheels exceed $LIMIT_MIB MiB" >&2
    exit 1
fi
