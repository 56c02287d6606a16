"""What README.md, CHANGELOG.md and docs/*.md name exists: every relative link resolves, and every
repository path, `make` target, `python -m` module, YAML file and config key written in backticks
is there. A renamed file or key fails here instead of sending a reader to nothing."""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from experiments.config import REPO_ROOT, ExperimentConfig

DOC_FILES = [REPO_ROOT / "README.md", REPO_ROOT / "ARCHITECTURE.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
             REPO_ROOT / "experiments" / "ablations" / "README.md"]
PACKAGES = ("modules", "datamodules", "experiments", "benchmarks", "tests")
TOP = PACKAGES + ("docs", "assets", ".ci")
ROOT_FILES = ("Makefile", "README.md", "CHANGELOG.md", "ARCHITECTURE.md", "environment.yml", "pyproject.toml",
              "requirements.txt", "requirements-eval.txt")
SECTIONS = ("model", "data", "optim", "trainer", "checkpoint", "eval", "logging", "paths")

LINK_RE = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_RE = re.compile(r"`([^`\n]+)`")
FENCE_RE = re.compile(r"^```.*?^```", re.S | re.M)
MAKE_RE = re.compile(r"(?:^|[\s;(&|])make\s+((?:[A-Z_]+=\S+\s+)*)([a-z][a-z0-9_-]*)")
PYM_RE = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")
KEY_RE = re.compile(r"^(" + "|".join(SECTIONS) + r")\.[A-Za-z_][\w.]*$")
FILE_EXT = (".yaml", ".yml", ".json", ".safetensors", ".pt", ".pth", ".md", ".py", ".png", ".txt", ".tar", ".csv")
# A page may show names that do not exist on purpose (a config error, a file the reader creates):
# the fenced block right after this marker is not checked.
SKIP = "<!-- docs-check: skip-next-block -->"
SKIP_RE = re.compile(re.escape(SKIP) + r"\s*\n```.*?^```", re.S | re.M)
SCHEMA = OmegaConf.structured(ExperimentConfig)


def make_targets() -> set:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", text, re.M))


def key_exists(dotted: str) -> bool:
    """Whether a dotted config key resolves in the typed schema (free-form mappings and lists,
    such as paths or model.load, accept any key below them)."""
    node = SCHEMA
    for seg in dotted.split("."):
        if isinstance(node, ListConfig):
            return True
        if not isinstance(node, DictConfig):
            return False
        if node._metadata.object_type in (None, dict):
            return True
        if seg not in node:
            return False
        node = node._get_node(seg)
    return True


def module_exists(mod: str) -> bool:
    base = REPO_ROOT / Path(*mod.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def path_like(span: str) -> bool:
    if any(c in span for c in "*<>{}$ ") or span.startswith(("runs/", "/", "~")):
        return False
    return span.split("/")[0] in TOP and "/" in span or span in ROOT_FILES


def problems(md: Path, text: str | None = None) -> List[str]:
    """Every name in ``md`` that points at nothing, as 'file: what (why)'."""
    text = md.read_text() if text is None else text
    text = SKIP_RE.sub("", text)
    rel = md.relative_to(REPO_ROOT) if md.is_relative_to(REPO_ROOT) else md
    out: List[str] = []
    targets = make_targets()
    for m in LINK_RE.finditer(text):
        link = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", link) or link.startswith("#"):
            continue  # a URL, mailto:, or an anchor in the same page
        target = (md.parent / link.split("#")[0]).resolve()
        if not target.exists():
            out.append(f"{rel}: link ({link}) resolves to nothing")
    fenced = " \n".join(b for b in FENCE_RE.findall(text))
    spans = CODE_RE.findall(FENCE_RE.sub("", text)) + fenced.splitlines()
    for span in spans:
        span = span.strip()
        for mm in MAKE_RE.finditer(span):
            if mm.group(2) not in targets:
                out.append(f"{rel}: `make {mm.group(2)}` is no Makefile target")
        for mod in PYM_RE.findall(span):
            if mod.split(".")[0] in PACKAGES and not module_exists(mod):
                out.append(f"{rel}: `python -m {mod}` is no module of the repository")
        for tok in re.split(r"[\s\"']+", span):
            tok = tok.strip(",;:()")
            key = tok.split("=", 1)[0]
            if KEY_RE.match(key) and not key.endswith(FILE_EXT) and not key_exists(key):
                out.append(f"{rel}: config key `{key}` is not in the schema (experiments/config.py)")
            elif "::" in tok and path_like(tok.split("::")[0]):  # a pytest node id: file and test
                f, name = tok.split("::")[0], tok.split("::")[-1].split("[")[0]
                if not (REPO_ROOT / f).is_file() or f"def {name}(" not in (REPO_ROOT / f).read_text():
                    out.append(f"{rel}: test `{tok}` does not exist")
            elif path_like(tok) and not (REPO_ROOT / tok.rstrip("/")).exists():
                out.append(f"{rel}: path `{tok}` does not exist")
    return out


@pytest.mark.parametrize("md", DOC_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_name_in_the_docs_exists(md):
    assert md.is_file(), f"{md} is missing"
    bad = problems(md)
    assert not bad, "\n".join(bad)


def test_the_checker_catches_what_it_should(tmp_path):
    """The checks themselves can fail: a broken link, path, target, module and key are reported."""
    md = REPO_ROOT / "docs" / "x.md"  # a page of docs/ (never written): links resolve from docs/
    text = ("[ok](../README.md) [broken](../nope/missing.md) [web](https://example.org) [anchor](#top)\n"
            "`experiments/world/stage1.yaml` `experiments/world/stage9.yaml` `make stage1` `make stage9`\n"
            "`python -m experiments.run` `python -m experiments.nope` `model.var_cond` `model.var_condd=x`\n"
            "`ARGS=\"trainer.max_steps=5 optim.lrr=1\"` `paths.anything` `model.load` `runs/whatever`\n"
            "```bash\nmake pipeline && python -m experiments.evaluate x eval.cfg=2 eval.nope=1\n```\n"
            "`model.yaml` `model.safetensors` `tests/test_docs.py::test_the_checker_catches_what_it_should`"
            " `tests/test_docs.py::test_nothing`\n" + SKIP + "\n```bash\nmake nothing-here optim.nope=1\n```\n")
    bad = problems(md, text)
    assert sorted(bad) == sorted([
        "docs/x.md: link (../nope/missing.md) resolves to nothing",
        "docs/x.md: path `experiments/world/stage9.yaml` does not exist",
        "docs/x.md: `make stage9` is no Makefile target",
        "docs/x.md: `python -m experiments.nope` is no module of the repository",
        "docs/x.md: config key `model.var_condd` is not in the schema (experiments/config.py)",
        "docs/x.md: config key `optim.lrr` is not in the schema (experiments/config.py)",
        "docs/x.md: config key `eval.nope` is not in the schema (experiments/config.py)",
        "docs/x.md: test `tests/test_docs.py::test_nothing` does not exist",
    ]), bad


def test_readme_is_for_a_newcomer():
    """At most 25 KB, at most 3 commit hashes, and its first screen says what the suite is, the
    two commands, how long they take and how good the result is."""
    text = (REPO_ROOT / "README.md").read_text()
    assert len(text.encode()) <= 25 * 1024, f"README.md is {len(text.encode())} bytes (at most 25 KB)"
    no_code = FENCE_RE.sub("", text)
    hashes = set(re.findall(r"`([0-9a-f]{7,40})`", no_code))
    assert len(hashes) <= 3, f"README.md names {len(hashes)} commits: {sorted(hashes)}"
    first = "\n".join(text.splitlines()[:60])
    for must in ("make stage1", "make test", "VQA", "attribute accuracy", " min "):
        assert must in first, f"the README's first 60 lines lack {must!r}"
