"""Every public function and class has an Examples section, and its docstring reads as plain text.

`help()` shows docstrings as written, so reStructuredText roles such as `:math:` and LaTeX
commands would appear raw there; only displayed equations (`.. math::` blocks, which the
documentation site renders) may use LaTeX. Inline math is written with Unicode symbols.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import pydoc
import re

import pytest

import rmsprop_jax as rj
import rmsprop_jax.checkpoint
import rmsprop_jax.sharding

# The modules whose docstrings open the pages of the API reference.
DOCUMENTED_MODULES = [rj, rj.compat, rj.sweep, rj.sharding, rj.checkpoint]

SHARDING_NAMES = ["state_shardings", "abstract_state"]


def public_objects() -> list[tuple[str, object]]:
    """(qualified name, object) for every public function and class of the package."""
    modules = [
        (rj, rj.__all__),
        (rj.compat, rj.compat.__all__),
        (rj.sweep, rj.sweep.__all__),
        (rj.sharding, SHARDING_NAMES),
        (rj.checkpoint, rj.checkpoint.__all__),
    ]
    found: list[tuple[str, object]] = []
    for module, names in modules:
        for name in names:
            value = getattr(module, name)
            if inspect.isclass(value) or inspect.isfunction(value):
                found.append((f"{module.__name__}.{name}", value))
    return found


PUBLIC = public_objects()
IDS = [name for name, _ in PUBLIC]
# Classes defined in `rmsprop_jax.storage`, whose docstrings are maintained with that package.
KNOWN_WITHOUT_EXAMPLES: dict[str, str] = {}
# A LaTeX command such as \leftarrow or \sqrt, or a reStructuredText math role.
RAW_MARKUP = re.compile(r":math:`|\\[A-Za-z]+")


def outside_math_blocks(text: str) -> str:
    """`text` without its `.. math::` blocks (the directive and its indented body)."""
    kept, block_indent = [], None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not line.strip() or indent > block_indent:
                continue
            block_indent = None
        if line.lstrip().startswith(".. math::"):
            block_indent = indent
            continue
        kept.append(line)
    return "\n".join(kept)


def prose(text: str) -> str:
    """`text` without math blocks and without doctest lines (whose code may use backslashes)."""
    lines = outside_math_blocks(text).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith((">>>", "...")))


def test_public_objects_found():
    assert {"rmsprop_jax.rmsprop", "rmsprop_jax.compat.torch_rmsprop"} <= set(IDS)
    assert {"rmsprop_jax.checkpoint.save", "rmsprop_jax.sharding.abstract_state"} <= set(IDS)


def test_markup_check_sees_inline_math_but_not_math_blocks():
    text = "Args:\n  eps: :math:`\\epsilon`.\n\n.. math::\n\n    \\nu_t = \\beta\n\nEnd."
    assert prose(text).count(":math:") == 1
    assert "\\nu_t" not in prose(text)
    assert "End." in prose(text)
    assert not RAW_MARKUP.search(prose("eps: ε ≥ 0.\n\n.. math::\n\n    \\sqrt{\\nu}\n"))


@pytest.mark.parametrize(
    "name,value",
    [
        pytest.param(
            name,
            value,
            marks=pytest.mark.xfail(reason=KNOWN_WITHOUT_EXAMPLES[name], strict=True),
        )
        if name in KNOWN_WITHOUT_EXAMPLES
        else (name, value)
        for name, value in PUBLIC
    ],
    ids=IDS,
)
def test_docstring_has_examples_section(name, value):
    doc = inspect.getdoc(value) or ""
    assert re.search(r"^Examples:\n\s+>>> ", doc, re.MULTILINE), f"{name}: no Examples section"
    # An example shows what the call gives, not only that it runs.
    examples = doctest.DocTestParser().get_examples(doc)
    assert any(example.want.strip() for example in examples), f"{name}: no example prints"


@pytest.mark.parametrize("name,value", PUBLIC, ids=IDS)
def test_docstring_shows_no_raw_markup_in_help(name, value):
    # typeshed's pydoc stub lacks `plaintext`, the plain-text renderer pydoc defines.
    plaintext = pydoc.plaintext  # type: ignore[attr-defined]
    for text in (inspect.getdoc(value) or "", pydoc.render_doc(value, renderer=plaintext)):
        raw = RAW_MARKUP.findall(prose(text))
        assert not raw, f"{name}: help() shows raw markup {sorted(set(raw))}"


# The storage formats' modules: `help(rj.storage.int8)` is where their design is documented.
STORAGE_MODULES = [
    importlib.import_module(f"rmsprop_jax.storage.{info.name}")
    for info in pkgutil.iter_modules(rj.storage.__path__)
]


def test_storage_modules_found():
    names = {module.__name__.rsplit(".", 1)[-1] for module in STORAGE_MODULES}
    assert {"int8", "bfloat16", "factored", "_rows", "_rounding", "_format"} <= names


@pytest.mark.parametrize(
    "module", [*DOCUMENTED_MODULES, rj.storage, *STORAGE_MODULES], ids=lambda m: m.__name__
)
def test_module_docstring_shows_no_raw_markup_in_help(module):
    raw = RAW_MARKUP.findall(prose(inspect.getdoc(module) or ""))
    assert not raw, f"{module.__name__}: help() shows raw markup {sorted(set(raw))}"
