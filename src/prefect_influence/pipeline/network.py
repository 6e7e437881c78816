"""The user's network and what is built from it: the trained module (factory + checkpoint),
its loss, a check that model, loss and data fit together, and the influence model the
configuration asks for."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
from enum import Enum
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import BUILTIN, LossName, Method, PipelineConfig, PreconditionerName
from ..errors import (
    ConfigurationError,
    InfluenceInputError,
    InputRankError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from ..storage import storage_options
from .data import HASH_ROWS, DataSource
from .inputs import read_bytes, resolve_import, torch_dtype

__all__ = [
    "load_network",
    "model_identity",
    "resolve_loss",
    "check_model_fits_data",
    "build_influence_model",
]


@functools.lru_cache(maxsize=2)
def _builtin_network() -> tuple[dict[str, torch.Tensor], bytes]:
    from ..example import load_digits_example, train_model

    state = train_model(load_digits_example()).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return state, buffer.getvalue()


def load_network(config: PipelineConfig) -> tuple[nn.Module, str]:
    """The trained network in eval mode, in the configured dtype and device, and a fingerprint
    of what determines it (factory + checkpoint bytes)."""
    spec = config.model
    if spec.factory == BUILTIN:
        from ..example import build_model

        network = build_model()
        state, raw = _builtin_network()
        if spec.checkpoint:
            raw = read_bytes(spec.checkpoint, storage_options(config), "checkpoint")
            state = _load_state_dict(raw, spec.checkpoint)
    else:
        factory = resolve_import(spec.factory, "model factory")
        if not callable(factory):
            raise ConfigurationError(f"model factory {spec.factory!r} is not callable.")
        try:
            network = factory(**spec.factory_kwargs)
        except TypeError as exc:
            raise ConfigurationError(
                f"model factory {spec.factory!r} cannot be called with {spec.factory_kwargs}: {exc}"
            ) from exc
        if not isinstance(network, nn.Module):
            raise ConfigurationError(
                f"model factory {spec.factory!r} returned {type(network).__name__}, not an nn.Module."
            )
        if not spec.checkpoint:
            raise ConfigurationError(
                "model.checkpoint is empty: influences need the trained weights (a state_dict "
                "saved with torch.save)."
            )
        raw = read_bytes(spec.checkpoint, storage_options(config), "checkpoint")
        state = _load_state_dict(raw, spec.checkpoint)
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigurationError(
            f"checkpoint {spec.checkpoint or BUILTIN!r} does not fit the model from "
            f"{spec.factory!r}: {exc}"
        ) from exc
    check_device(config.device.value)
    network = network.to(device=config.device.value, dtype=torch_dtype(config.dtype)).eval()
    digest = hashlib.sha256(raw).hexdigest()
    return network, f"{model_identity(config)}|sha256:{digest}"


def model_identity(config: PipelineConfig) -> str:
    """What the configuration alone says about the network: factory and its arguments (the
    network fingerprint adds the checkpoint's digest)."""
    return f"{config.model.factory}|{json_kwargs(config.model.factory_kwargs)}"


def check_device(name: str) -> None:
    """Refuse a CUDA device this process cannot use, before anything is computed or written
    (torch would fail later with "Torch not compiled with CUDA enabled")."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
        raise ConfigurationError(
            f"device={name!r}, but this process has no usable CUDA device (torch "
            f"{torch.__version__}, built with {build}). Run where a GPU is visible with a CUDA "
            "build of torch (the flow process and every Dask worker need one), or set "
            "device='cpu'."
        )


def json_kwargs(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True, default=str)


def _load_state_dict(raw: bytes, url: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigurationError(
            f"checkpoint {url!r} is not a plain state_dict of tensors; it was refused by "
            f"torch.load(weights_only=True) (it may contain arbitrary Python objects): {exc}"
        ) from exc
    except Exception as exc:
        raise ConfigurationError(f"checkpoint {url!r} cannot be loaded: {exc}") from exc
    if not isinstance(state, dict):
        raise ConfigurationError(
            f"checkpoint {url!r} holds a {type(state).__name__}, not a state_dict."
        )
    return state


def resolve_loss(name: str) -> Callable:
    if name == LossName.cross_entropy.value:
        return nn.functional.cross_entropy
    if name == LossName.mse.value:
        return nn.functional.mse_loss
    loss = resolve_import(name, "loss")
    if not callable(loss):
        raise ConfigurationError(f"loss {name!r} is not callable.")
    return loss


def check_model_fits_data(network: nn.Module, loss_name: str, source: DataSource, dtype) -> None:
    """Run the network on the first rows and the loss on the first one, and check labels
    against the outputs, so a wrong input rank, label dtype or out-of-range labels fail before
    any expensive work (and before anything is written)."""
    x, y = source.rows(0, min(len(source), 64))
    tx = torch.from_numpy(np.ascontiguousarray(x))
    tx = tx.to(dtype) if tx.is_floating_point() else tx
    try:
        with torch.no_grad():
            out = network(tx)
    except Exception as exc:
        raise InputRankError(
            f"{source.description}: the model cannot be applied to inputs of shape "
            f"{tuple(x.shape[1:])} per sample: {exc}"
        ) from exc
    if loss_name == LossName.cross_entropy.value:
        if not np.issubdtype(y.dtype, np.integer):
            raise InfluenceInputError(
                f"{source.description}: cross_entropy needs integer class labels in y, got {y.dtype}."
            )
        n_classes = out.shape[1] if out.ndim > 1 else 1
        labels = np.concatenate(
            [source.rows(s, s + HASH_ROWS)[1].reshape(-1) for s in range(0, len(source), HASH_ROWS)]
        )
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            raise InfluenceInputError(
                f"{source.description}: {int(bad.sum())} label(s) outside [0, {n_classes}) for a "
                f"model with {n_classes} outputs (e.g. {int(labels[bad][0])})."
            )
    elif loss_name == LossName.mse.value and tuple(out.shape[1:]) != tuple(y.shape[1:]):
        raise ShapeMismatchError(
            f"{source.description}: mse targets have shape {tuple(y.shape[1:])} per sample but "
            f"the model outputs {tuple(out.shape[1:])}."
        )
    # the loss itself, on one sample as the influence models evaluate it (labels as the
    # pipeline passes them: floating ones in the computation dtype, integer ones unchanged)
    ty = torch.from_numpy(np.ascontiguousarray(y[:1]))
    ty = ty.to(dtype) if ty.is_floating_point() else ty
    loss = resolve_loss(loss_name)
    try:
        with torch.no_grad():
            value = loss(out[:1], ty)
    except Exception as exc:
        hint = ""
        if loss_name == LossName.cross_entropy.value and y.dtype != np.int64:
            hint = " (cross_entropy takes int64 class labels: store y as int64)"
        raise InfluenceInputError(
            f"{source.description}: the loss {loss_name!r} fails on the model's output and y "
            f"({y.dtype}, shape {tuple(y.shape[1:])} per sample){hint}: {exc}"
        ) from exc
    if value.numel() != 1:
        raise InfluenceInputError(
            f"{source.description}: the loss {loss_name!r} must return a scalar for one sample, "
            f"got shape {tuple(value.shape)}."
        )


def build_influence_model(config: PipelineConfig, network: nn.Module):
    """The (unfitted) influence model the configuration describes."""
    from .. import torch as methods

    m = config.method
    loss = resolve_loss(config.model.loss)
    reg = m.regularization
    blocks = m.block_structure
    shape = {"block_structure": blocks.value if isinstance(blocks, Enum) else dict(blocks)}
    curvature = {**shape, "second_order_mode": m.second_order_mode.value}
    if m.name is Method.direct:
        return methods.DirectInfluence(network, loss, reg, **curvature)
    if m.name is Method.datainf:
        return methods.InverseHarmonicMeanInfluence(network, loss, reg, **shape)
    if m.name is Method.cg:
        pre = None
        if m.preconditioner is PreconditionerName.jacobi:
            pre = methods.JacobiPreconditioner(num_samples_estimator=4)
        elif m.preconditioner is PreconditionerName.nystroem:
            pre = methods.NystroemPreconditioner(rank=m.preconditioner_rank)
        return methods.CgInfluence(
            network,
            loss,
            reg,
            rtol=m.rtol,
            atol=m.atol,
            maxiter=m.maxiter,
            preconditioner=pre,
            solve_simultaneously=True,  # block CG: the right-hand sides share one Krylov space
            batch_size=m.fit_batch_size,
            **curvature,
        )
    if m.name is Method.lissa:
        return methods.LissaInfluence(
            network,
            loss,
            reg,
            maxiter=m.maxiter or 1000,
            dampen=m.lissa_dampen,
            scale=m.lissa_scale,
            rtol=m.rtol,
            batch_size=m.fit_batch_size,
            **curvature,
        )
    if m.name is Method.arnoldi:
        return methods.ArnoldiInfluence(
            network, loss, reg, rank=m.rank, krylov_dimension=m.krylov_dimension, **curvature
        )
    if m.name is Method.nystroem:
        return methods.NystroemSketchInfluence(network, loss, reg, rank=m.rank, **curvature)
    if m.name is Method.ekfac:
        ekfac = methods.EkfacInfluence(
            network,
            update_diagonal=True,
            hessian_regularization=reg,
            loss=loss,
            fisher=m.fisher.value,
            fisher_samples=m.fisher_samples,
            seed=m.fisher_seed,
        )
        ekfac.check_layers()  # fit would refuse an unsupported layer: refuse it when planning
        return ekfac
    raise ConfigurationError(f"unknown method {m.name!r}")  # pragma: no cover - enum guards it


def layer_terms_bytes(config, model, source: DataSource) -> Optional[int]:
    """Bytes of one train sample's layer terms when the job's columns can score layer by layer
    (Up mode, a model of ``nn.Linear`` and ``nn.Conv2d`` layers, no stored train features: the
    columns hold those terms instead of gradients), else ``None``."""
    from ..base import InfluenceMode
    from ..blocks import scores_by_layer

    if config.train_features.value != "none" or not scores_by_layer(
        model, InfluenceMode.parse(config.mode)
    ):
        return None
    x, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in source.rows(0, 1))
    try:
        return int(model.layer_terms(x, y).nbytes)  # the model moves them to its dtype and device
    except UnsupportedLayerError:
        if config.method.name is Method.ekfac:
            raise  # EK-FAC has no other way: refused when planning, not when fitting
        return None  # a layer called twice per forward pass: the columns form gradients
