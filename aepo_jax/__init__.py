"""aepo-jax: JAX reference implementation of AEPO (Arbitrary Entropy Policy Optimization).

Paper: "Arbitrary Entropy Policy Optimization" (arXiv 2510.08141).
"""

__version__ = "0.1.0"
