"""The lmms-eval extra stays optional: its pins live apart from the base pins and never touch them,
`make setup` does not install it, and the suite imports without it (these run in every CI)."""
from __future__ import annotations

import ast
import re
import tomllib

from tests.conftest import REPO_ROOT
from tests.test_environment import _pins


def test_eval_requirements_are_exact_pins_that_leave_the_base_alone():
    base = _pins((REPO_ROOT / "requirements.txt").read_text().splitlines())
    extra = _pins((REPO_ROOT / "requirements-eval.txt").read_text().splitlines())
    assert "lmms-eval" in extra
    assert sorted(set(base) & set(extra)) == [], "the extra must not re-pin a base package"


def test_make_setup_does_not_install_the_extra():
    mk = (REPO_ROOT / "Makefile").read_text()
    setup_venv = (REPO_ROOT / ".ci" / "setup-venv.sh").read_text()
    assert "requirements-eval" not in setup_venv
    setup_rule = re.search(r"^setup:.*$", mk, re.M).group(0)
    assert "eval" not in setup_rule
    for target in ("setup-eval", "test-eval", "eval-benchmarks"):
        assert re.search(rf"^{target}:", mk, re.M), target
    assert "requirements-eval.txt" in (REPO_ROOT / ".ci" / "setup-eval.sh").read_text()


def test_the_entry_point_names_the_model_class():
    py = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    ep = py["project"]["entry-points"]["lmms_eval.models"]["vargpt_suite"]
    assert ep == "experiments.lmms_eval_plugin:manifest"
    import experiments.lmms_eval_plugin as plugin  # imports nothing of lmms-eval at module level

    module, cls = plugin.CLASS_PATH.rsplit(".", 1)
    src = (REPO_ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert cls in {n.name for n in ast.parse(src).body if isinstance(n, ast.ClassDef)}
    assert any(m.startswith("lmms_eval:") for m in py["tool"]["pytest"]["ini_options"]["markers"])


def test_only_the_adapter_files_import_lmms_eval():
    """The rest of the suite must import without the extra."""
    allowed = {"experiments/lmms_eval_model.py", "experiments/lmms_eval_plugin.py", "experiments/eval_benchmarks.py"}
    bad = []
    for pkg in ("datamodules", "modules", "experiments", "benchmarks"):
        for p in (REPO_ROOT / pkg).rglob("*.py"):
            rel = str(p.relative_to(REPO_ROOT))
            if rel in allowed or rel.startswith("experiments/lmms_tasks/"):
                continue
            for node in ast.walk(ast.parse(p.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                if any(n.split(".")[0] == "lmms_eval" for n in names):
                    bad.append(rel)
    assert bad == []


def test_a_missing_extra_fails_in_ci_and_is_skipped_with_the_command_elsewhere():
    from tests.conftest import eval_extra_missing

    action, why = eval_extra_missing({"CI": "true"}, installed=False)
    assert action == "fail" and "make setup-eval" in why
    action, why = eval_extra_missing({}, installed=False)
    assert action == "skip" and "make setup-eval" in why
    assert eval_extra_missing({"CI": "true"}, installed=True) == ("", "")
    import tests.test_lmms_eval as t  # the harness tests go through that decision, none around it

    marks = {m.name: m for m in t.pytestmark}
    assert "skipif" not in marks and marks["usefixtures"].args == ("lmms_eval_extra",)


def test_ci_installs_the_extra_before_the_tests():
    lines = [ln.strip() for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if not ln.startswith("#")]
    export = next(ln for ln in lines if ln.startswith("export "))
    assert "CI=true" in export.split()
    setup = next(i for i, ln in enumerate(lines) if ln.startswith("make setup-eval"))
    test = next(i for i, ln in enumerate(lines) if ln.startswith("make test"))
    assert setup < test and "exit 1" in lines[setup]  # a failed install fails CI, before any test
