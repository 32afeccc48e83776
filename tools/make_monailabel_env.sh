#!/usr/bin/env bash
# Build the MONAI Label 0.8.5 environment that tests/test_monailabel.py starts the server from.
# Usage: tools/make_monailabel_env.sh [VENV_DIR]   (default: $LITEMED_MLVENV or /tmp/mlvenv)
# It is a separate venv (about 8 GB, a few minutes): MONAI Label needs torch 2.14.1 + torchvision, which cannot live
# beside the project's torch 2.13.0 CPU build. Nothing of this repository is installed into it: the tests give the
# server self-contained bundles (tools/export_bundle.py). Rerunning is a no-op while the venv matches
# requirements-monailabel.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${LITEMED_MLVENV:-/tmp/mlvenv}}"
req="$here/requirements-monailabel.txt"
stamp="$venv/.litemed-requirements"
if [ -f "$stamp" ] && cmp -s "$stamp" "$req" && "$venv/bin/python" -c "import monailabel, torchvision" 2>/dev/null; then
    echo "MONAI Label environment up to date: $venv"
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
# torch and torchvision first: sam2 (a MONAI Label dependency, sdist only) builds against the installed torch
"$venv/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
# SAM2_BUILD_CUDA=0: build sam2 without its CUDA extension; the server runs with --conf sam2 false anyway
SAM2_BUILD_CUDA=0 "$venv/bin/pip" install -q --no-build-isolation -r "$req"
"$venv/bin/pip" check
"$venv/bin/python" -c "import monailabel, torchvision, monai; print('monailabel', monailabel.__version__, 'monai', monai.__version__)"
cp "$req" "$stamp"
echo "MONAI Label environment ready: $venv"
