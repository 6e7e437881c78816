"""pyDVL's module path ``pydvl.influence.torch.preconditioner``: every name of
:mod:`prefect_influence.torch.preconditioners`."""

from .preconditioners import *  # noqa: F403
from .preconditioners import __all__ as _module_names

# the module's list, read at import, so preconditioners added to it appear here without an edit
__all__ = list(_module_names)
