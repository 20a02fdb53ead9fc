"""The package's imports run one way: each module imports only modules above it in the layers table
of docs/ARCHITECTURE.md, so the table is both the reading order and a fact."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import ROOT, shell_env

from kaggle_cifar import TORCH_LOADED_FIRST


def test_modules_import_only_modules_above_them_in_the_architecture_table():
    layers = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    order = re.findall(r"^\| `kaggle_cifar/(\w+)\.py` \|", layers, flags=re.M)
    on_disk = sorted(p.stem for p in (ROOT / "kaggle_cifar").glob("*.py") if p.stem != "__init__")
    assert sorted(order) == on_disk, "docs/ARCHITECTURE.md's layers table and kaggle_cifar/ list different modules"
    for position, name in enumerate(order):
        tree = ast.parse((ROOT / "kaggle_cifar" / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "kaggle_cifar":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kaggle_cifar."):
                imported.add(node.module.split(".")[1])
        below = imported - set(order[:position])
        assert not below, f"kaggle_cifar/{name}.py imports {sorted(below)}, which docs/ARCHITECTURE.md lists below it"


@pytest.mark.parametrize("script", ["train_folds.py", "predict.py", "search.py", "doctor.py", "report.py", "submit.py",
                                    "prepare.py"])
def test_every_scripts_help_answers_without_loading_torch(script):
    import subprocess
    import sys

    code = (f"import sys, runpy; sys.argv = [{script!r}, '--help']\n"
            f"try:\n    runpy.run_path('scripts/{script}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip().splitlines()[-1] == "False" and "--help" in out


def test_the_unpacking_script_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, runpy; sys.argv = ['prepare.py', '--help']; import kaggle_cifar.cli, kaggle_cifar.prepare; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for folder in ("scripts", "bench")
                                           for p in (ROOT / folder).glob("*.py")))
def test_a_script_imports_the_package_before_any_library_that_may_load_torch(script):
    """Most tests run a script inside the test's process (conftest.call_python), where the package
    has long been loaded, so each script's first import outside the standard library is read here.
    It must be the package (or bench/common.py, which imports it first): it sets OpenMP's wait
    policy, which torch reads once, as it loads. The tests that start a script as a process of its
    own also check what it printed (conftest.run_python)."""
    import sys

    tree = ast.parse((ROOT / script).read_text())
    imports = sorted((node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))),
                     key=lambda node: node.lineno)
    modules = [name.split(".")[0] for node in imports
               for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])]
    outside = [name for name in modules if name not in (*sys.stdlib_module_names, "__future__")]
    assert outside and outside[0] in ("kaggle_cifar", "common"), f"{script} imports {outside[:1]} first"


def test_torch_loaded_before_the_package_is_named_since_openmp_then_keeps_spinning():
    import subprocess
    import sys

    env = shell_env()
    late = subprocess.run([sys.executable, "-c", "import torch, kaggle_cifar"], capture_output=True, text=True,
                          cwd=ROOT, env=env, check=True)
    assert TORCH_LOADED_FIRST in late.stderr
    first = subprocess.run([sys.executable, "-c", "import kaggle_cifar, torch, os; print(os.environ['OMP_WAIT_POLICY'])"],
                           capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert TORCH_LOADED_FIRST not in first.stderr and first.stdout.strip() == "PASSIVE"


def test_compiling_without_a_cuda_runtime_prints_no_guess_of_cuda_home():
    import subprocess
    import sys

    code = "import kaggle_cifar, torch.utils.cpp_extension"  # what inductor loads as it compiles on the CPU
    env = dict(shell_env(), CUDA_VISIBLE_DEVICES="")
    env.pop("CUDA_HOME", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    assert "CUDA_HOME" not in proc.stderr, proc.stderr


def test_at_exit_the_package_leaves_torchs_objects_to_the_process_end_not_the_garbage_collector():
    """The exit handlers freeze what is alive, so the interpreter's last collections skip it."""
    import subprocess
    import sys

    code = "import kaggle_cifar, torch, atexit, gc; atexit._run_exitfuncs(); print(gc.get_freeze_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert int(out) > 10_000  # torch alone leaves over 100,000 objects for the collector
