"""The README's Python examples run as written (keeps the README true). Blocks fenced ```python run here;
the model walkthrough is fenced ```py: it needs the embedded model and minutes of CPU (make demo runs it)."""

import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def test_readme_python_blocks_run():
    with open(README) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "the README should show how to use the package"
    scope: dict = {}
    torch.manual_seed(0)
    for block in blocks:  # blocks build on each other, like a session
        exec(compile(block, README, "exec"), scope)
