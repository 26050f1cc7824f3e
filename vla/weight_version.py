"""A cheap answer to "have this module's weights changed since I last looked?", for inference-time caches.

Inference caches (the action head's fused experts, the backbone's BatchNorm-folded encoder) hold values computed
from weights and must be rebuilt whenever a weight changes: an optimiser step or `load_state_dict` (in-place, they
bump a tensor's version counter), `.to()` or `param.data = ...` (new storage, a new data pointer), or a new
`Parameter` object assigned to a module (a new tensor identity). The key covers all three. Walking
`module.parameters()` on every call costs ~2 ms for a 264-tensor encoder (the generator walk, not the tensors), so
the tensors are listed once and listed again only after any module anywhere registered a parameter, buffer or
submodule (a counter fed by torch's public global registration hooks, installed on import; they only count and
change nothing); reading the list's pointers and versions costs ~0.2 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable

from torch import nn
from torch.nn.modules import module as _module

_registrations = 0


def _count_registration(*_args: object) -> None:
    global _registrations
    _registrations += 1


_module.register_module_parameter_registration_hook(_count_registration)
_module.register_module_buffer_registration_hook(_count_registration)
_module.register_module_module_registration_hook(_count_registration)


class WeightVersion:
    """Hashable keys that differ whenever a module's parameters (and, optionally, buffers) may have changed.

    Args:
        buffers: include buffers (BatchNorm running statistics) in the key. Leave False for modules whose buffers
            change on every forward (counters) but do not enter the cached values.
    """

    def __init__(self, buffers: bool = False) -> None:
        self.buffers = buffers
        self._tensors: tuple = ()
        self._listed_for: tuple[int, int] | None = None  # (id of the module, registration count) of the list

    def key(self, module: nn.Module) -> Hashable:
        listed_for = (id(module), _registrations)
        if listed_for != self._listed_for:
            tensors = module.parameters()
            if self.buffers:
                tensors = itertools.chain(tensors, module.buffers())
            self._tensors = tuple(tensors)
            self._listed_for = listed_for
        return tuple((id(t), t.data_ptr(), t._version) for t in self._tensors)
