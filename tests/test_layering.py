"""The folders are the architecture: each layer imports only from the layers below it (imports inside functions
count too), and importing the 2D packages pulls in neither MONAI nor the medical side.

    utils (torch-only helpers), ops (kernels)  <-  models  <-  engine (mmengine/mmseg glue), medical (MONAI)
    <-  apis  <-  profiling  (<-  tools/, benchmarks/, outside the package)
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "vilseg"
LAYER: Dict[str, int] = {"utils": 0, "ops": 1, "models": 2, "engine": 3, "medical": 3, "apis": 4, "profiling": 5}


def _imports(path: Path) -> List[Tuple[int, str]]:
    """(line, absolute module name) of every vilseg import in the file."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "vilseg" or name.startswith("vilseg.")]


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYER), folders ^ set(LAYER)


def test_no_module_imports_from_a_layer_above_or_beside_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0]
        if own not in LAYER:
            continue
        for line, name in _imports(path):
            other = _layer_of(name)
            if other in ("", own):
                continue
            if other not in LAYER or LAYER[other] >= LAYER[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {name} ({other})")
    assert not wrong, "\n".join(wrong)


def test_2d_packages_load_neither_monai_nor_the_medical_side():
    code = ("import sys, vilseg.models, vilseg.engine, vilseg.apis\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('monai', 'nibabel') "
            "or m.startswith('vilseg.medical') or m == 'vilseg.models.vil_unetr'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout
