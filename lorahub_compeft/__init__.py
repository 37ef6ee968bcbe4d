"""lorahub-compeft: few-shot adaptation by composing ComPEFT-compressed LoRA experts."""
from . import coding  # noqa: F401  (lorahub_compeft.coding, the entropy coder)
from .adapters import Adapter, AdapterError, load_adapter, save_adapter
from .compose import CompositionResult, compose
from .codec import CompressionError, calibrate, prune, sparsify
from .expert import CompressedExpert, ExpertFileError, compress, load_expert
from .library import ExpertLibrary, LibraryError
from .merge import merge
from .residual import residual_adapter

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterError", "load_adapter", "save_adapter", "CompressionError",
           "calibrate", "prune", "sparsify", "CompressedExpert", "ExpertFileError", "compress",
           "load_expert", "ExpertLibrary", "LibraryError", "compose", "CompositionResult", "merge",
           "residual_adapter"]
