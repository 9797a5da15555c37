"""Every Python import the user docs show works from a user's own project: a folder holding its
own train.py, generator.py, shards.py and dataset_server.py (as most ML projects do), where
top-level packages of those names would be shadowed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PROJECT_FILES = ("train.py", "generator.py", "shards.py", "dataset_server.py")


def doc_imports() -> list[str]:
    """The import statements of every ```python block of the docs (multi-line ones joined)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S):
            try:
                tree = ast.parse(block)
            except SyntaxError:  # a fragment with '...': take its import lines alone
                tree = ast.parse("\n".join(line.strip() for line in block.splitlines()
                                           if re.match(r"\s*(from \S+ )?import ", line)))
            found += [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return sorted(set(found))


def test_the_docs_show_imports_of_the_package() -> None:
    imports = doc_imports()
    assert any(i.startswith("from cifar5m import") and "SampleStream" in i for i in imports), imports


def test_every_doc_import_works_beside_a_users_own_train_py(tmp_path: Path) -> None:
    for name in PROJECT_FILES:  # a user's modules, each of which fails loudly if imported
        (tmp_path / name).write_text(f"raise SystemExit('imported the project file {name}')\n")
    lines = [i for i in doc_imports() if i.split()[1].split(".")[0] == "cifar5m"]
    script = tmp_path / "check_imports.py"
    script.write_text("\n".join([*lines, "import sys", "print('torch' in sys.modules)"]) + "\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout
    assert len(lines) >= 3


def test_import_cifar5m_and_its_api_names_import_no_torch_until_used(tmp_path: Path) -> None:
    for name in PROJECT_FILES:
        (tmp_path / name).write_text("raise SystemExit('imported a project file')\n")
    code = ("import sys, cifar5m\n"
            "assert 'torch' not in sys.modules\n"
            "from cifar5m import Dataset, DatasetWriter, Sample, write_synthetic_dataset\n"
            "assert 'torch' not in sys.modules, 'shards names pulled in torch'\n"
            "from cifar5m import SampleStream, StreamConfig\n"
            "assert 'torch' in sys.modules\n"
            "import cifar5m.train.stream as s\n"
            "assert SampleStream is s.SampleStream and StreamConfig is s.StreamConfig\n"
            "assert set(cifar5m.__all__) <= set(dir(cifar5m))\n"
            "for name in cifar5m.__all__: getattr(cifar5m, name)\n"
            "try:\n    cifar5m.nope\nexcept AttributeError as e: print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "has no attribute 'nope'" in out.stdout
