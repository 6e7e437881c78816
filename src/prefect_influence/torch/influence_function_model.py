"""pyDVL's module path ``pydvl.influence.torch.influence_function_model``: every name of
:mod:`prefect_influence.torch`."""

from . import *  # noqa: F403
from . import __all__ as _package_names

# the package's list, read at import, so models added to it appear here without an edit
__all__ = list(_package_names)
