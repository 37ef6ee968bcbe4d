"""Composition: choose experts, decode them once into a stack, and learn their weights on a few
examples (composer.py reads top to bottom as the algorithm; each step has its own module)."""
from lorahub_compeft.compose.composer import DEFAULT_N, compose
from lorahub_compeft.compose.result import CompositionResult

__all__ = ["compose", "CompositionResult", "DEFAULT_N"]
