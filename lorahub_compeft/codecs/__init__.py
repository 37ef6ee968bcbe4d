"""codecs: the Codec protocol and registry (base.py), and the shipped codecs, registered when
this package is imported: ComPEFT (compeft.py, its bits in coding.py) and ERE (ere.py)."""
from lorahub_compeft.codecs import compeft, ere  # each registers itself

__all__ = ["compeft", "ere"]
