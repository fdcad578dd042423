"""torch is optional: only xrv_scores.py's modules import it; everything else works without it."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_MODULES = {"medleak.xrv.models", "medleak.xrv.preprocess", "medleak.xrv.inference", "medleak.xrv.scores"}
TORCH_PACKAGES = ("torch", "torchvision", "torchxrayvision")


def imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_xrv_inference_modules_import_torch():
    offenders = []
    for path in sorted(list((ROOT / "src").rglob("*.py")) + list(ROOT.glob("*.py"))):
        base = ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT
        module = ".".join(path.relative_to(base).with_suffix("").parts)
        if module in TORCH_MODULES:
            continue
        for name in imported_modules(path):
            if name.split(".")[0] in TORCH_PACKAGES or name in TORCH_MODULES:
                # the scores entry point imports medleak.xrv.scores inside its main, after flag parsing: allowed
                if not (module == "medleak.xrv.cli" and name == "medleak.xrv.scores"):
                    offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


# As if torch were not installed: its import fails and it never appears in sys.modules.
BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "torchxrayvision"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code):
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_attack_side_runs_without_torch_and_scores_says_what_to_install(tmp_path):
    from tests.test_xrv_attack import synthetic_audit

    synthetic_audit(tmp_path / "logs", "chexpert", leak=1.5, seed=0)
    synthetic_audit(tmp_path / "logs", "mimic", leak=0.0, seed=1)
    attack = run_without_torch(
        "import runpy\n"
        f"sys.argv = ['xrv_attack.py', '--logdir={tmp_path / 'logs'}', '--out_dir={tmp_path / 'figs'}']\n"
        "try:\n"
        "    runpy.run_path('xrv_attack.py', run_name='__main__')\n"
        "finally:\n"
        "    assert 'torch' not in sys.modules\n")
    assert attack.returncode == 0, attack.stderr[-2000:]
    assert "chexpert: target-model vs reference-model: RMIA AUC" in attack.stdout
    assert (tmp_path / "figs" / "roc.png").is_file() and (tmp_path / "figs" / "report.html").is_file()

    scores = run_without_torch(
        "import runpy\n"
        f"sys.argv = ['xrv_scores.py', '--logdir={tmp_path}']\n"
        "runpy.run_path('xrv_scores.py', run_name='__main__')\n")
    assert scores.returncode == 2, scores.stderr[-2000:]
    last = scores.stderr.strip().splitlines()[-1]
    assert last.startswith("error: xrv_scores.py needs torch") and "requirements-xrv.txt" in last
    assert "Traceback" not in scores.stderr
