// MathJax for the docstrings' math (docs/hooks.py marks it with the class "arithmatex").
window.MathJax = {
  tex: {inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]]},
  options: {ignoreHtmlClass: ".*", processHtmlClass: "arithmatex"},
};
