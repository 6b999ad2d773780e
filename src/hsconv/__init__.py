"""hsconv: hidden-state convergence of Transformer language models.

Stages (each a function here and a subcommand of the ``hsconv`` CLI, wired together by the Snakefile):
prepare a model → prepare evaluation texts → dump per-layer hidden-state movement → convergence metrics → figures.
"""

__version__ = "0.1.0"
