"""eval"""
# The registry (methods.METHODS) holds every method wherever the runner is used from: the
# baselines register themselves when their module is imported.
from lorahub_compeft.eval import baselines

__all__ = ["baselines"]
