"""Every ```python block of README.md runs as written.

The blocks run one by one, each in a fresh namespace, in a directory holding what the README's
commands leave there: `ew-warehouse` (a tiny random BERT with 6 layers, as MiniLM has, over 80
Debian descriptions with layer-4 token states and a head `section-head`), `serve/section.onnx`
from `ew export-head` and `train.parquet` from `ew export --split train`. A block that imports a
package that is not installed is skipped, saying which; a block the line before which is
`<!-- not run by tests: REASON -->` is skipped with that reason.
"""
import ast
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = re.compile(r"<!-- not run by tests: (.+) -->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(first line number, code, reason not to run it) of every ```python block."""
    blocks, lines = [], text.splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            before = lines[start - 2] if start >= 2 else ""
            reason = NOT_RUN.match(before.strip())
            blocks.append((start + 1, "\n".join(lines[start:number - 1]) + "\n", reason and reason.group(1)))
            start = None
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def missing_modules(code: str) -> list[str]:
    """The top-level packages ``code`` imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory, labelled_corpus, tiny_bert_6_layers) -> Path:
    from pipelines.fitting import fit_head
    from pipelines.head_export import export_registered_head
    from pipelines.ingest import ingest
    from warehouse import Warehouse
    from warehouse.training_set import write_training_set

    here = tmp_path_factory.mktemp("readme")
    model = tiny_bert_6_layers
    corpus = here / "debian.jsonl"
    corpus.write_text("".join(labelled_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:80]))
    wh = Warehouse.open(here / "ew-warehouse", create=True)
    ingest(wh, corpus, model=str(model), token_states=4, progress=False)
    fit_head(wh, label="section", epochs=2, name="section-head", progress=False)
    export_registered_head(wh, "section-head", output=here / "serve" / "section.onnx")
    write_training_set(wh.training_set(label="section", split="train"), here / "train.parquet")
    return here


def test_the_readme_has_python_recipes():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("line", "code", "reason"), BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_recipe_runs_as_written(line, code, reason, readme_dir, monkeypatch):
    if reason:
        pytest.skip(reason)
    missing = missing_modules(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}, which is not installed")
    monkeypatch.chdir(readme_dir)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
