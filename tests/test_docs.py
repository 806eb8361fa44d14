"""The documentation builds cleanly and its examples are true.

- The Sphinx site in docs/ builds with warnings as errors, as in CI.
- The ``Examples`` sections of the public docstrings run as doctests.
- The ``>>>`` examples in the Markdown pages of docs/ run as doctests, page
  by page, so that the numbers the pages quote (the ranking example, the
  inf/NaN table, the quickstart loop) are the numbers the code returns.
"""

from __future__ import annotations

import doctest
import importlib
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Modules whose public docstrings carry examples; each must have some.
MODULES_WITH_EXAMPLES = ["sortpool_ref._api", "sortpool_ref.layer"]
# Further public modules: their examples, if any, must pass too.
OTHER_PUBLIC_MODULES = ["sortpool_ref", "sortpool_ref.reference",
                        "sortpool_ref._engines", "sortpool_ref.testing._compare",
                        "sortpool_ref.testing._kit", "sortpool_ref.torch"]

# Pages with examples that must hold.
PAGES_WITH_EXAMPLES = ["contract.md", "quickstart.md", "numerics.md",
                       "index.md"]

_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def _run(tests):
    """Run doctests with one shared runner; return (failed, tried, report)."""
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    for test in tests:
        # Keep the namespace: later blocks of a page build on earlier ones.
        runner.run(test, out=out.write, clear_globs=False)
    result = runner.summarize(verbose=False)
    return result.failed, result.attempted, out.getvalue()


@pytest.fixture(autouse=True)
def _numpy_print_defaults():
    """Doctest output assumes NumPy's default print options."""
    with np.printoptions(legacy=False, precision=8, linewidth=75):
        yield


def test_sphinx_builds_without_warnings(tmp_path):
    for name in ("sphinx", "myst_parser", "numpydoc"):
        pytest.importorskip(name)
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b",
           "html", str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    assert (tmp_path / "html" / "contract.html").is_file()


@pytest.mark.parametrize("module_name",
                         MODULES_WITH_EXAMPLES + OTHER_PUBLIC_MODULES)
def test_docstring_examples(module_name):
    module = importlib.import_module(module_name)
    # The finder skips objects only re-exported by the module.
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = finder.find(module, module_name, globs={})
    failed, tried, report = _run(tests)
    if module_name in MODULES_WITH_EXAMPLES:
        assert tried > 0, f"{module_name}: no docstring examples found"
    assert failed == 0, report


def _page_tests(page: Path):
    text = page.read_text(encoding="utf-8")
    parser = doctest.DocTestParser()
    globs: dict = {"__name__": f"docs.{page.stem}"}
    for match in _FENCE.finditer(text):
        block = match.group(1)
        if ">>>" not in block:
            continue
        lineno = text.count("\n", 0, match.start(1))
        test = parser.get_doctest(block, globs, f"{page.name}:{lineno + 1}",
                                  str(page), lineno)
        test.globs = globs  # one namespace per page (DocTest copies globs)
        yield test


@pytest.mark.parametrize("page", PAGES_WITH_EXAMPLES)
def test_page_examples(page):
    path = DOCS / page
    tests = list(_page_tests(path))
    assert tests, f"docs/{page}: no >>> examples found"
    failed, tried, report = _run(tests)
    assert failed == 0, report
