"""MkDocs hook: the docstrings are in PyTorch's reStructuredText style; this renders what Markdown leaves
of their markup. ``:math:`...``` becomes inline math and a ``.. math::`` paragraph display math (drawn by
MathJax, ``javascripts/mathjax.js``); ``:func:``, ``:class:`` and the other references become code, and
"Example::" before a code block "Example:"."""

import re

_REFERENCE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):<code>(~?)([^<]*)</code>")
_INLINE_MATH = re.compile(r":math:<code>([^<]*)</code>")
_DISPLAY_MATH = re.compile(r"<p>\.\. math::\s*(.*?)</p>", re.DOTALL)
_LITERAL_INTRO = re.compile(r"<p>([^<]*?)::</p>")  # "Example::" before a code block


def _reference(match: re.Match) -> str:
    short, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    html = _REFERENCE.sub(_reference, html)
    html = _INLINE_MATH.sub(r'<span class="arithmatex">\\(\1\\)</span>', html)
    html = _DISPLAY_MATH.sub(r'<div class="arithmatex">\\[\1\\]</div>', html)
    return _LITERAL_INTRO.sub(r"<p>\1:</p>", html)
