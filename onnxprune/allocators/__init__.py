"""Allocations (how a step's sparsity is split across tensors), one module each, registered in
ALLOCATORS on import. A new one is a module with an `@register` Allocator subclass, imported here."""

from . import builtin, sensitivity  # noqa: F401  (register)
from .base import ALLOCATORS, Allocator, register
from .pattern import PatternConstraint

# --allocation auto: the candidates that declare `auto_candidate`, compared on held-out samples
# (searches.resolve_allocation)
AUTO = "auto"
CHOICES = (AUTO, *ALLOCATORS.names())

__all__ = ["ALLOCATORS", "AUTO", "CHOICES", "Allocator", "PatternConstraint", "register"]
