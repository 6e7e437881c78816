"""Every exception prefect-influence raises on purpose: one hierarchy, one module.

Bad input raises a subclass of :class:`InfluenceInputError` (itself a :class:`ValueError`), so
callers may catch either. Messages say what was wrong and, where there is one, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "PrefectInfluenceError",
    "InfluenceInputError",
    "NotFittedError",
    "ShapeMismatchError",
    "EmptyDataError",
    "InputRankError",
    "NonFiniteError",
    "InvalidRegularizationError",
    "InvalidRankError",
    "InvalidParameterError",
    "FittedStateError",
    "UnsupportedInfluenceModeError",
    "InvalidDimensionChunksError",
    "UnalignedChunksError",
    "ThreadSafetyViolationError",
    "StorageError",
    "ArrayExistsError",
    "ConfigurationError",
    "JobRefusedError",
    "ConfigMismatchError",
    "LeaseHeldError",
    "NotImplementedLayerRepresentationException",
    "UnsupportedLayerError",
    "TorchLinalgEighException",
    "NotFittedException",
    "UnsupportedInfluenceModeException",
]


class PrefectInfluenceError(Exception):
    """Base class of all errors raised by prefect-influence."""


class InfluenceInputError(PrefectInfluenceError, ValueError):
    """Bad input: a value, shape or configuration that cannot be computed with."""


class NotFittedError(PrefectInfluenceError, ValueError, RuntimeError):
    """A computing method of an influence model was called before :meth:`fit`.

    A :class:`ValueError`, as pyDVL's ``NotFittedException`` is, and a :class:`RuntimeError`.
    """


class ShapeMismatchError(InfluenceInputError):
    """Two inputs that must agree in length or shape do not (e.g. x and y)."""


class EmptyDataError(InfluenceInputError):
    """A data set, batch or data loader holds no samples."""


class InputRankError(InfluenceInputError):
    """An input tensor has the wrong number of dimensions."""


class NonFiniteError(InfluenceInputError):
    """A loss, gradient or input contains NaN or Inf."""


class InvalidRegularizationError(InfluenceInputError):
    """The regularization is negative, or not positive where the method needs it."""


class InvalidRankError(InfluenceInputError):
    """A low-rank method was asked for a rank it cannot deliver (≤ 0 or > n_parameters)."""


class InvalidParameterError(InfluenceInputError):
    """An option of a method is out of its range (maxiter ≤ 0, negative tolerance, ...)."""


class FittedStateError(InfluenceInputError):
    """A fitted state does not belong to this model (missing keys, wrong shapes)."""


class UnsupportedInfluenceModeError(InfluenceInputError):
    """The influence mode is not one of :class:`~prefect_influence.InfluenceMode`."""


class InvalidDimensionChunksError(InfluenceInputError):
    """A dask array is chunked along a dimension other than the first (sample) dimension."""


class UnalignedChunksError(InfluenceInputError):
    """Inputs and labels are chunked differently along the sample dimension."""


class ConfigurationError(InfluenceInputError):
    """A configuration entry cannot be resolved (import path, checkpoint, data URL...)."""


class NotImplementedLayerRepresentationException(InfluenceInputError):
    """A method that works layer by layer (EK-FAC) met a trainable layer it has no
    representation for (pyDVL's name)."""


class UnsupportedLayerError(NotImplementedLayerRepresentationException, NotImplementedError):
    """A trainable layer EK-FAC has no Kronecker representation for (or one it cannot use: tied
    parameters, a layer called more than once per forward pass).

    Raised by :meth:`~prefect_influence.torch.EkfacInfluence.fit` (not at construction, as in pyDVL); also a
    :class:`NotImplementedError`, which is what earlier versions of this package raised.
    """


class JobRefusedError(InfluenceInputError):
    """A job refused while it was checked, before anything started: its file cannot be read, or
    the method does not support a layer of the network."""


class ThreadSafetyViolationError(InfluenceInputError):
    """A model that is not thread-safe would run on Dask workers with more than one thread."""


class TorchLinalgEighException(PrefectInfluenceError, RuntimeError):
    """``torch.linalg.eigh`` failed (some LAPACK builds do on large matrices, pytorch/pytorch
    #92141); pyDVL's name. The original error is the ``__cause__`` and is quoted in the
    message."""

    def __init__(self, original_exception: BaseException):
        super().__init__(
            "torch.linalg.eigh failed; on large matrices some LAPACK builds do (pytorch/pytorch"
            "#92141). Use a method that needs no dense eigendecomposition (e.g. CG or Arnoldi) "
            "or a smaller block. Original error: "
            f"{original_exception}"
        )
        self.original_exception = original_exception

    def __reduce__(self):
        # rebuilt from the original error, so a copy sent between processes keeps its message
        return type(self), (self.original_exception,)


class StorageError(PrefectInfluenceError):
    """Reading or writing results failed or found inconsistent data."""


class ArrayExistsError(StorageError, FileExistsError):
    """An array exists at the target location and ``overwrite`` was not requested."""


class ConfigMismatchError(StorageError, ValueError):
    """The output holds results of a different configuration."""


class LeaseHeldError(StorageError):
    """Another live run holds the output's lease."""


# -- pyDVL's names ------------------------------------------------------------------------------
# aliases, not subclasses: ``except``/``pytest.raises`` with pyDVL's name must catch what this
# package raises

#: pyDVL's name of :class:`NotFittedError`.
NotFittedException = NotFittedError

#: pyDVL's name of :class:`UnsupportedInfluenceModeError`.
UnsupportedInfluenceModeException = UnsupportedInfluenceModeError
