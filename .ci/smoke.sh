#!/usr/bin/env bash
# Smoke test of a real install: build the wheel, install it into a fresh virtual environment
# outside the checkout, and run every command from an empty folder, as a new user would.
#
#   bash .ci/smoke.sh [PYTHON]
#
# PYTHON (default: python3) builds the wheel; it needs pip and setuptools (the CI venv).
# Nothing here reads the checkout after the wheel is built: a command that still needed a
# file of the repository (names.txt, models/, a top-level `cli` module) fails. A fresh venv
# downloads bnfold's dependencies; SMOKE_VENV=DIR keeps one between runs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/bnfold-smoke.XXXXXX")
SERVER=""
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "build the wheel"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/bnfold-*.whl)
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assert "bnfold/mlp/names.txt" in names, "names.txt is not packaged"
assert "bnfold/serve/static/index.html" in names, "the web page is not packaged"
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
assert tops == {"bnfold"}, f"the wheel installs more than bnfold: {sorted(tops)}"
print(f"{len(names)} files, top level: bnfold only")
EOF

VENV="$WORK/venv"
if [ -n "${SMOKE_VENV:-}" ]; then
    # a venv kept between runs (outside the checkout): only bnfold itself is reinstalled
    step "reinstall the wheel into $SMOKE_VENV"
    VENV=$SMOKE_VENV
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$WHEEL" 2> >(grep -v "^WARNING: Location" >&2)
    "$VENV/bin/pip" install -q --no-deps --force-reinstall "$WHEEL"
else
    step "install into a fresh venv (torch from the local wheel)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "$WHEEL" 2> >(grep -v "^WARNING: Location" >&2)
fi
BNFOLD="$VENV/bin/bnfold"
PY="$VENV/bin/python"

mkdir "$WORK/empty"
cd "$WORK/empty"
export PYTHONPATH=  # the installed package, never a checkout
"$PY" -c 'import bnfold, pathlib; p = pathlib.Path(bnfold.__file__); assert "site-packages" in str(p), p; print("bnfold from", p.parent)'

step "bnfold --version / --help"
"$BNFOLD" --version
"$BNFOLD" --help >/dev/null

step "train (the packaged names.txt, ./models default shown as relative)"
case "$("$BNFOLD" train --help)" in *"(./models)"*) ;; *) echo "--out default is not ./models" >&2; exit 1 ;; esac
"$BNFOLD" train --steps 20 --batch-size 256 --out run --report run/report
"$BNFOLD" report run/report

step "train-fold into ./models"
"$BNFOLD" train-fold --steps 30 --batch-size 256 --out models
test -f models/bn.pt -a -f models/folded.pt -a -f models/bn.onnx -a -f models/folded.onnx

step "fold a .pt and an .onnx"
"$BNFOLD" fold run/bn.pt
"$BNFOLD" fold models/bn.onnx --out refolded.onnx --json >fold.json
"$PY" -c 'import json; d = json.load(open("fold.json")); assert d["passed"] and d["fold"]["complete"], d'

step "verify"
"$BNFOLD" verify run/bn.pt run/folded.pt
"$BNFOLD" verify models/bn.onnx refolded.onnx

step "export"
"$BNFOLD" export run/bn.pt --out exported
test -f exported/bn.onnx -a -f exported/folded.onnx

step "sample (./models/folded.onnx, labels from the packaged names.txt)"
"$BNFOLD" sample -n 5 -v
"$BNFOLD" sample exported/folded.onnx -n 3

step "serve + one request + clean shutdown"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BNFOLD" serve --port "$PORT" --log-level warning &
SERVER=$!
for _ in $(seq 1 300); do  # up to 60 s for the worker to load and warm up
    if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; then break; fi
    kill -0 "$SERVER" 2>/dev/null || { echo "serve exited early" >&2; exit 1; }
    sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/v1/names?count=3&seed=1"
echo
kill -TERM "$SERVER"
wait "$SERVER"
SERVER=""

step "nothing written where bnfold is installed"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for stray in models data cli.py; do
    if [ -e "$SITE/$stray" ]; then echo "stray $SITE/$stray" >&2; exit 1; fi
done
echo "smoke test passed"
