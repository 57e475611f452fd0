"""Every ```python block of README.md and docs/**/*.md runs as written.

Each block runs on its own, in a fresh namespace and a temporary working directory, so it
must bring its own imports and data. A block that must not run (one that joins a cluster of
processes, say) is preceded by an HTML comment that says why:

    <!-- not run: joins a multi-process cluster -->

Blocks that import PyTorch or Keras follow the conformance policy of conftest.py: they skip
when the framework is missing, unless RMSPROP_JAX_REQUIRE_CONFORMANCE=1.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import import_reference_framework

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$", re.DOTALL)
FRAMEWORKS = ("torch", "keras")
OPTIONAL = ("flax", "orbax", "sklearn", "matplotlib")


class Block(NamedTuple):
    path: Path
    line: int
    code: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown file, with the reason given for not running one."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = text[: match.start()].rstrip().splitlines()
        marker = NOT_RUN.search(before[-1]) if before else None
        line = text.count("\n", 0, match.start()) + 1
        reason = marker.group("reason") if marker else None
        blocks.append(Block(path, line, match.group(2), reason))
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in python_blocks(path)]


def test_documents_have_blocks():
    # Guards the extraction itself: a broken pattern would otherwise pass by finding nothing.
    names = {block.path.name for block in BLOCKS}
    assert {"README.md", "flax.md", "scaling.md", "getting_started.md"} <= names
    assert len(BLOCKS) >= 15


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_code_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip_reason is not None:
        assert block.skip_reason, f"{block.name}: say why the block is not run"
        pytest.skip(block.skip_reason)
    tree = ast.parse(block.code, filename=block.name)
    for node in ast.walk(tree):
        # `...` as a statement stands for code the reader cannot run.
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            assert node.value.value is not Ellipsis, (
                f"{block.name}, line {node.lineno}: `...` in place of code"
            )
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            for module in modules:
                if module and module.split(".")[0] in FRAMEWORKS:
                    import_reference_framework(module.split(".")[0])
                elif module and module.split(".")[0] in OPTIONAL:
                    # Not installable everywhere (flax 0.11 needs a newer JAX than the floor).
                    pytest.importorskip(module.split(".")[0])
    monkeypatch.chdir(tmp_path)  # blocks may write checkpoints into the working directory
    exec(compile(tree, block.name, "exec"), {"__name__": "__docs__"})
