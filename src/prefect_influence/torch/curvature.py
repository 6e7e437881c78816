"""Which curvature matrix an influence model inverts (``SecondOrderMode``) and which of its
blocks it keeps (``BlockMode`` or named blocks of parameters: a block-diagonal approximation)."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Optional, Union

from torch import Tensor, nn

from ..errors import InvalidParameterError, InvalidRegularizationError

__all__ = [
    "BlockMode",
    "SecondOrderMode",
    "BlockStructure",
    "ModelParameterDictBuilder",
    "parameter_blocks",
    "block_regularizations",
    "checked_regularization",
]


class BlockMode(Enum):
    """How the trainable parameters are grouped into diagonal blocks of the Hessian.

    ``FULL``: one block of all parameters (named ``""``), the whole Hessian. ``LAYER_WISE``:
    one block per top-level child module (named as the child), cross-layer curvature dropped.
    ``PARAMETER_WISE``: one block per parameter tensor (named as the parameter).
    """

    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"
    FULL = "full"


class SecondOrderMode(Enum):
    """Which curvature matrix stands for the Hessian of the mean training loss.

    ``HESSIAN``: the Hessian itself. ``GAUSS_NEWTON``: the mean outer product of the per-sample
    gradients ``(1/n) Σ ∇ℓᵢ ∇ℓᵢᵀ`` (the empirical Fisher; pyDVL's name), positive semi-definite,
    so ``+ λI`` with ``λ > 0`` is always invertible. ``GENERALIZED_GAUSS_NEWTON``: ``(1/n) Σ Jᵢᵀ
    Hᵢ Jᵢ`` with ``Jᵢ`` the Jacobian of the model's outputs in the parameters and ``Hᵢ`` the
    Hessian of the loss in the outputs: the Hessian without the terms of the network's own
    curvature, positive semi-definite for convex losses such as cross-entropy and squared error.
    The two Gauss-Newton modes agree only where the residuals' outer product equals the loss's
    curvature (in expectation over labels drawn from the model, not on observed labels).
    """

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"
    GENERALIZED_GAUSS_NEWTON = "generalized_gauss_newton"

    @classmethod
    def parse(cls, value: Union["SecondOrderMode", str]) -> "SecondOrderMode":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidParameterError(
                f"second_order_mode must be one of {names}; got {value!r}."
            ) from None


BlockStructure = Union[BlockMode, str, Mapping[str, list[str]]]


def _parse_mode(value: Union[BlockMode, str]) -> BlockMode:
    if isinstance(value, BlockMode):
        return value
    try:
        return BlockMode(str(value).lower())
    except ValueError:
        names = ", ".join(m.value for m in BlockMode)
        raise InvalidParameterError(
            f"block_structure must be one of {names} or a mapping of block names to parameter "
            f"names; got {value!r}."
        ) from None


def _mode_blocks(model: nn.Module, mode: BlockMode) -> "OrderedDict[str, list[str]]":
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if mode is BlockMode.FULL:
        return OrderedDict([("", trainable)])
    if mode is BlockMode.PARAMETER_WISE:
        return OrderedDict((n, [n]) for n in trainable)
    blocks: "OrderedDict[str, list[str]]" = OrderedDict()
    for name in trainable:
        # a parameter of the root module itself is a block of its own, named as the parameter
        layer = name.split(".", 1)[0] if "." in name else name
        blocks.setdefault(layer, []).append(name)
    return blocks


def parameter_blocks(
    model: nn.Module, block_structure: BlockStructure
) -> "OrderedDict[str, list[str]]":
    """Block name → names of the trainable parameters in it, in the model's parameter order.

    A mapping is checked before any work: every name must be a parameter of the model and in
    one block only; frozen parameters are dropped with a warning, and a block left empty is
    refused. Trainable parameters in no block are left out of the influence computation.
    """
    if isinstance(block_structure, (BlockMode, str)):
        return _mode_blocks(model, _parse_mode(block_structure))
    if not isinstance(block_structure, Mapping) or not block_structure:
        raise InvalidParameterError(
            "block_structure must be a BlockMode or a non-empty mapping of block names to lists "
            f"of parameter names; got {block_structure!r}."
        )
    named = dict(model.named_parameters())
    order = {n: i for i, n in enumerate(named)}
    owner: dict[str, str] = {}
    blocks: "OrderedDict[str, list[str]]" = OrderedDict()
    for block, names in block_structure.items():
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise InvalidParameterError(
                f"Block {block!r} must list parameter names (strings); got {names!r}."
            )
        kept = []
        for name in names:
            if name not in named:
                close = [n for n in named if n.endswith(name) or name.endswith(n)][:3]
                hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
                raise InvalidParameterError(
                    f"Block {block!r} names {name!r}, which is not a parameter of the model"
                    f"{hint}. Parameters: {', '.join(named)}."
                )
            if name in owner:
                raise InvalidParameterError(
                    f"Parameter {name!r} is in block {owner[name]!r} and in block {block!r}; "
                    "each parameter may be in one block only."
                )
            owner[name] = str(block)
            if named[name].requires_grad:
                kept.append(name)
            else:
                warnings.warn(
                    f"Parameter {name!r} of block {block!r} is frozen (requires_grad=False) and "
                    "is left out of the influence computation.",
                    UserWarning,
                    stacklevel=3,
                )
        if not kept:
            raise InvalidParameterError(f"Block {block!r} holds no trainable parameter.")
        blocks[str(block)] = sorted(kept, key=order.__getitem__)
    return blocks


def checked_regularization(value: Any, where: str = "") -> float:
    """``λ`` as a float: a finite number ≥ 0, ``None`` meaning 0."""
    if value is None:
        return 0.0
    try:
        reg = float(value)
    except (TypeError, ValueError):
        reg = math.nan
    if not math.isfinite(reg) or reg < 0:
        raise InvalidRegularizationError(
            f"regularization{where} must be a finite number ≥ 0, got {value!r}."
        )
    return reg


def block_regularizations(
    regularization: Union[None, float, Mapping[str, Optional[float]]],
    blocks: Mapping[str, list[str]],
    required: Optional[str],
) -> dict[str, float]:
    """``λ`` of every block from one number or a mapping block name → number. With
    ``required`` (the name of a method that divides by ``λ``) every block needs one > 0."""
    if isinstance(regularization, Mapping):
        unknown = sorted(set(map(str, regularization)) - set(blocks))
        if unknown:
            raise InvalidRegularizationError(
                f"regularization names blocks {unknown} that are not in the block structure "
                f"({', '.join(map(repr, blocks))})."
            )
        values = {b: regularization.get(b) for b in blocks}
    else:
        values = {b: regularization for b in blocks}
    result = {}
    for block, value in values.items():
        where = f" of block {block!r}" if len(blocks) > 1 or block else ""
        if value is None:
            if required:
                raise InvalidRegularizationError(
                    f"{required} needs regularization > 0{where}; none was given."
                )
            value = 0.0
        reg = checked_regularization(value, where)
        if required and reg == 0:
            raise InvalidRegularizationError(
                f"{required} needs regularization > 0{where} (it divides by it); got 0."
            )
        result[block] = reg
    return result


@dataclass
class ModelParameterDictBuilder:
    """Parameters of ``model`` grouped by a block structure: block name → parameter name →
    parameter (detached unless ``detach=False``). Frozen parameters are left out."""

    model: nn.Module
    detach: bool = True

    def _take(self, names: list[str]) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() if self.detach else named[n] for n in names}

    def build(self, block_structure: Mapping[str, list[str]]) -> dict[str, dict[str, Tensor]]:
        blocks = parameter_blocks(self.model, block_structure)
        return {block: self._take(names) for block, names in blocks.items()}

    def build_from_block_mode(self, block_mode: BlockMode) -> dict[str, dict[str, Tensor]]:
        blocks = _mode_blocks(self.model, _parse_mode(block_mode))
        return {block: self._take(names) for block, names in blocks.items()}
