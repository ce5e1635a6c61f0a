"""What onnxprune adds to onnx2torch's converters.

- `added`, `rnn`: operators and versions onnx2torch lacks, registered in its own registry.
- `aliases`: versions whose interface did not change, served by the existing converter.
- `overrides`: our registry of replacements for onnx2torch converters (consulted first).

Importing this package registers everything once.
"""

from . import added, rnn  # noqa: F401  (register in onnx2torch's registry)
from .aliases import Alias, register_aliases
from .overrides import OVERRIDES

# After our own additions, so that e.g. ReduceMax-20 borrows our ReduceMax-18.
ALIASES: list[Alias] = register_aliases()

__all__ = ["ALIASES", "OVERRIDES", "Alias"]
