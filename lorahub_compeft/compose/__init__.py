"""Composition: choose experts, decode them once into a stack, and learn their weights on a few
examples (composer.py reads top to bottom as the algorithm; each step has its own module)."""
from lorahub_compeft.config import DEFAULT_N, PAPER_COMPOSE, ComposeConfig
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.compose.result import CompositionResult

__all__ = ["compose", "ComposeConfig", "CompositionResult", "DEFAULT_N", "PAPER_COMPOSE"]
