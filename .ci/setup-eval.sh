#!/usr/bin/env bash
# The optional evaluation extra (`make setup-eval`), on top of `make setup`'s .venv: lmms-eval and
# what it adds (requirements-eval.txt, exact pins) with requirements.txt as constraints, so no base
# pin can move; then the project itself, editable and without dependencies, so lmms-eval's
# entry point `vargpt_suite` (pyproject.toml) exists. Same index handling as setup-venv.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "[setup-eval] no .venv: run make setup first" >&2; exit 1; }
start=$(date +%s)
extra=$(pip config get global.extra-index-url 2>/dev/null || true)
links=$(pip config get global.find-links 2>/dev/null || true)
if [ -x .venv/bin/uv ]; then
  UV_EXTRA_INDEX_URL="$extra" UV_FIND_LINKS="$links" .venv/bin/uv pip install --python .venv/bin/python \
    --index-strategy unsafe-best-match --compile-bytecode -q -r requirements-eval.txt -c requirements.txt
  UV_EXTRA_INDEX_URL="$extra" UV_FIND_LINKS="$links" .venv/bin/uv pip install --python .venv/bin/python \
    --index-strategy unsafe-best-match -q --no-deps -e .
else
  .venv/bin/python -m pip install -q -r requirements-eval.txt -c requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
fi
# The model must resolve through lmms-eval's own registry (the entry point), not only import.
.venv/bin/python -c "
from lmms_eval.models import get_model_manifest
m = get_model_manifest('vargpt_suite')
assert m.simple_class_path == 'experiments.lmms_eval_model.VargptSuite', m
import lmms_eval, importlib.metadata as md
print('[setup-eval] lmms-eval', md.version('lmms_eval'), '- model vargpt_suite ->', m.simple_class_path)
"
echo "[setup-eval] done in $(( $(date +%s) - start )) s"
