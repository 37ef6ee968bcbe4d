"""lorahub-compeft: few-shot adaptation by composing ComPEFT-compressed LoRA experts.

Layers, lowest first (each imports only from its own layer or below; tests/test_layers.py):
config and sampling; io/ (files, PEFT adapters, base models); codecs/ (ComPEFT, ERE: array
math); store/ (the expert file and the library); compose/ and merge.py; eval/ (BBH, methods,
runner, report); zoo/ (the shipped zoo at run time); cli/ (the command line).
"""
from lorahub_compeft.codecs.compeft import CompressionError, calibrate, prune, sparsify
from lorahub_compeft.compose import CompositionResult, compose
from lorahub_compeft.config import (PAPER_COMPEFT, PAPER_COMPOSE, CompeftOptions, ComposeConfig,
                                    EreOptions)
from lorahub_compeft.io.adapters import Adapter, AdapterError, load_adapter, save_adapter
from lorahub_compeft.io.residuals import residual_adapter
from lorahub_compeft.merge import merge
from lorahub_compeft.store.expert import CompressedExpert, ExpertFileError, compress, load_expert
from lorahub_compeft.store.library import ExpertLibrary, LibraryError

__version__ = "0.1.0"
__all__ = ["Adapter", "AdapterError", "load_adapter", "save_adapter", "CompressionError",
           "calibrate", "prune", "sparsify", "CompressedExpert", "ExpertFileError", "compress",
           "load_expert", "ExpertLibrary", "LibraryError", "compose", "CompositionResult", "merge",
           "residual_adapter", "CompeftOptions", "EreOptions", "PAPER_COMPEFT", "ComposeConfig",
           "PAPER_COMPOSE"]
