"""The framework-neutral contract of an influence function model, and the influence modes.

Definitions used throughout the package (no minus sign, as in pyDVL):

* ``H`` is the Hessian of the **mean** training loss plus ``regularization · I``.
* ``influence_factors(x, y)[i] = H⁻¹ ∇θ ℓ(x_i, y_i)`` (shape ``n × p``).
* :attr:`InfluenceMode.Up`: ``influences[i, j] = ⟨H⁻¹ ∇θ ℓ(test_i), ∇θ ℓ(train_j)⟩``
  (shape ``n_test × n_train``).
* :attr:`InfluenceMode.Perturbation`: ``influences[i, j] = ∇_{x_j} ⟨H⁻¹ ∇θ ℓ(test_i), ∇θ ℓ(train_j)⟩``
  (shape ``n_test × n_train × *x.shape[1:]``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import Any, Generic, Optional, TypeVar

from .errors import NotFittedError, ShapeMismatchError, UnsupportedInfluenceModeError

__all__ = ["InfluenceMode", "InfluenceFunctionModel", "require_fitted", "check_factors_shape"]

TensorType = TypeVar("TensorType")
DataType = TypeVar("DataType")


class InfluenceMode(str, Enum):
    """Which influence to compute.

    ``Up``: effect of up-weighting a training point; ``Perturbation``: effect of perturbing its
    input (a gradient with respect to the training input).
    """

    Up = "up"
    Perturbation = "perturbation"

    @classmethod
    def parse(cls, mode: "InfluenceMode | str") -> "InfluenceMode":
        """Accept an :class:`InfluenceMode` or its value/name (``"up"``, ``"Perturbation"``)."""
        if isinstance(mode, cls):
            return mode
        if isinstance(mode, str):
            for member in cls:
                if mode.lower() in (member.value, member.name.lower()):
                    return member
        raise UnsupportedInfluenceModeError(
            f"Unsupported influence mode {mode!r}; use one of "
            f"{[m.name for m in cls]} (InfluenceMode.Up or InfluenceMode.Perturbation)."
        )


class InfluenceFunctionModel(ABC, Generic[TensorType, DataType]):
    """An approximation of the inverse Hessian of a trained model, applied to gradients.

    Life cycle: construct with the trained model and its loss, call :meth:`fit` once with the
    training data, then call the computing methods any number of times, from any process the
    fitted object is sent to. Calling a computing method before :meth:`fit` raises
    :class:`~prefect_influence.NotFittedError`.
    """

    @abstractmethod
    def fit(self, data: DataType) -> "InfluenceFunctionModel":
        """Fit the inverse-Hessian approximation on the training data; return ``self``."""

    @property
    @abstractmethod
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`load_fitted_state`) has run."""

    @property
    @abstractmethod
    def n_parameters(self) -> int:
        """Number of trainable parameters ``p``: the length of a gradient and of a factor."""

    @property
    @abstractmethod
    def is_thread_safe(self) -> bool:
        """Whether one instance may be used from several threads of a process at once."""

    @abstractmethod
    def influence_factors(self, x: TensorType, y: TensorType) -> TensorType:
        """``H⁻¹ ∇θ ℓ(x_i, y_i)`` for every sample ``i`` of the batch: shape ``n × p``."""

    @abstractmethod
    def influences_from_factors(
        self,
        z_test_factors: TensorType,
        x: TensorType,
        y: TensorType,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        """Influences of precomputed factors (``n_test × p``) on the training batch ``(x, y)``."""

    def influences(
        self,
        x_test: TensorType,
        y_test: TensorType,
        x: Optional[TensorType] = None,
        y: Optional[TensorType] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> TensorType:
        """Influences of the test batch on the training batch (the test batch itself if omitted).

        Equal to ``influences_from_factors(influence_factors(x_test, y_test), x, y, mode)``.
        """
        mode = InfluenceMode.parse(mode)
        if (x is None) != (y is None):
            from .errors import InfluenceInputError

            missing = "x" if x is None else "y"
            raise InfluenceInputError(
                f"Pass both training inputs x and labels y, or neither; {missing} is missing."
            )
        factors = self.influence_factors(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors(factors, x, y, mode)

    @abstractmethod
    def fitted_state(self) -> dict[str, Any]:
        """The fitted state as a flat ``dict`` of tensors (no pickle needed to store it)."""

    @abstractmethod
    def load_fitted_state(self, state: dict[str, Any]) -> "InfluenceFunctionModel":
        """Restore a state from :meth:`fitted_state`; return ``self``, now fitted."""


def require_fitted(model: Any) -> None:
    """Raise :class:`~prefect_influence.NotFittedError` unless ``model`` is fitted."""
    if not getattr(model, "is_fitted", True):
        raise NotFittedError(
            f"{type(model).__name__} is not fitted: call .fit(train_dataloader) first."
        )


def check_factors_shape(shape: tuple, n_parameters: int) -> None:
    """Influence factors are ``n_test × p``; raise :class:`ShapeMismatchError` otherwise."""
    if len(shape) != 2 or shape[1] != n_parameters:
        raise ShapeMismatchError(
            f"z_test_factors must have shape (n_test, {n_parameters}), got {tuple(shape)}."
        )
