"""README.md's array-API example runs as written, from a directory outside the checkout, against the
installed package (`pip install -r requirements.txt` installs it editable)."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ```python block of README's "Bring your own models" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Bring your own models\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "README.md: no ```python block under '## Bring your own models'"
    return blocks[0]


def test_bring_your_own_models_example_runs_outside_the_checkout(tmp_path):
    distribution = importlib.metadata.distribution("medleak")  # not installed: pip install -r requirements.txt
    assert distribution.version
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what pip installed
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The example's memorised patients (records 0-9) are its five most exposed ones.
    top = re.findall(r"^\d+\s+(patient\d{3})\s", result.stdout, flags=re.MULTILINE)
    assert sorted(top) == [f"patient{i:03d}" for i in range(5)], result.stdout
    assert "attack scores: (1, 200)" in result.stdout
    assert not list(tmp_path.iterdir())  # wrote nothing

