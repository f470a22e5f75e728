"""Every Python block of the README and of each docs page runs, in order per page, as a reader pasting
them into one session would run them. A block right after ``<!-- needs: cuda -->`` runs only where
CUDA is available; one right after ``<!-- skip: REASON -->`` never runs: keep those for what cannot run
in a test (a ``torchrun`` process group, a long training), and rare."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- (skip: \S.*?|needs: cuda) -->\n$")  # a skip without a reason is no marker

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first line, code, marker or "")`` of each fenced Python block of a Markdown ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        marker = MARKER.search(before)
        blocks.append((before.count("\n") + 2, match.group(1), marker.group(1).strip() if marker else ""))
    return blocks


def runs_here(marker: str) -> bool:
    return not marker or (marker == "needs: cuda" and torch.cuda.is_available())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace = {"__name__": "__main__"}
    for line, code, marker in python_blocks(page.read_text()):
        if runs_here(marker):
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)  # noqa: S102 (the docs' own code)


def test_skipped_blocks_say_why_and_are_rare():
    skipped = [(page.name, line, marker) for page in PAGES for line, _, marker in python_blocks(page.read_text())
               if marker.startswith("skip")]
    assert len(skipped) <= 3, f"expected at most 3 blocks marked <!-- skip: ... -->, got {skipped}"
    for page in PAGES:
        text = page.read_text()
        markers = len(re.findall(r"^<!-- (?:skip|needs)", text, re.MULTILINE))
        assert markers == sum(1 for *_, marker in python_blocks(text) if marker), (
            f"{page.name}: each '<!-- skip: REASON -->' or '<!-- needs: cuda -->' must sit on the line just above "
            "a ```python block, and a skip must say why")


def test_blocks_are_found_with_their_markers():
    text = ("a\n```python\nx = 1\n```\n<!-- skip: needs torchrun -->\n```python\ny = x\n```\n```bash\nls\n```\n"
            "<!-- needs: cuda -->\n```python\nz = 2\n```\n<!-- skip:  -->\n```python\n```\n")
    assert python_blocks(text) == [(3, "x = 1\n", ""), (7, "y = x\n", "skip: needs torchrun"),
                                   (14, "z = 2\n", "needs: cuda"), (18, "", "")]


def test_the_readme_gives_the_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert command in ci.splitlines() and command in (ROOT / "README.md").read_text()
