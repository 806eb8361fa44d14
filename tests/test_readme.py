"""The README's example runs and says what it claims."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    y, pool = namespace["y"], namespace["pool"]
    assert y.shape == (8, 16, 16, 16) and y.dtype == np.float32
    assert pool.grad.shape == (3,)
    np.testing.assert_allclose(namespace["y64"], y, rtol=1e-5, atol=1e-5)


def test_readme_names_the_commands_ci_runs():
    text = README.read_text()
    assert "<!-- test-command -->" in text and "<!-- main-command -->" in text


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", text,
                      re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert block in [line.strip() for line in ci]
