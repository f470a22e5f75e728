"""Every Python block of the README and of each docs page runs, in order per page, as a reader pasting
them into one session would run them. A block preceded by ``<!-- skip: REASON -->`` is not run: keep
those for what cannot run in a test (a ``torchrun`` process group, a GPU, a long training)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!-- skip: (.*?) -->\n$")

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(first line, code, skip reason or "")`` of each fenced Python block of a Markdown ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        skip = SKIP.search(before)
        blocks.append((before.count("\n") + 2, match.group(1), skip.group(1).strip() if skip else ""))
    return blocks


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    namespace = {"__name__": "__main__"}
    for line, code, skip in python_blocks(page.read_text()):
        if not skip:
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)  # noqa: S102 (the docs' own code)


def test_skipped_blocks_say_why_and_are_rare():
    skipped = [(page.name, line, reason) for page in PAGES for line, _, reason in python_blocks(page.read_text())
               if reason]
    assert len(skipped) <= 3, f"expected at most 3 blocks marked <!-- skip: ... -->, got {skipped}"
    for page in PAGES:
        markers = page.read_text().count("<!-- skip")
        reasons = sum(1 for *_, reason in python_blocks(page.read_text()) if reason)
        assert markers == reasons, f"{page.name}: every '<!-- skip: REASON -->' must give a reason and sit on the " \
                                   "line just above a ```python block"


def test_blocks_are_found():
    text = "a\n```python\nx = 1\n```\n<!-- skip: needs torchrun -->\n```python\ny = x\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", ""), (7, "y = x\n", "needs torchrun")]


def test_the_readme_gives_the_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert command in ci.splitlines() and command in (ROOT / "README.md").read_text()
