"""K-FAC and EK-FAC: Kronecker-factored inverse Hessians for Linear and Conv2d nets."""

from __future__ import annotations

import collections.abc
import logging
import time
from typing import Any, Iterable, Iterator, Literal, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import InfluenceMode
from ..errors import (
    FittedStateError,
    InfluenceInputError,
    InvalidParameterError,
    InvalidRegularizationError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .base import TorchInfluenceFunctionModel, TrainingData, check_finite_terms, positive_int
from .curvature import checked_regularization
from .functional import LossFunction, check_finite
from .layers import (
    Layer,
    LayerTerms,
    TensorColumns,
    add_layer_scores,
    find_layers,
    forward_recorded,
    output_grads_of,
)
from .layers import scores as layer_scores

__all__ = ["EkfacInfluence", "UnsupportedLayerError"]

logger = logging.getLogger(__name__)

LossType = Literal["cross_entropy", "mse"]
_LOSS_TYPES = ("cross_entropy", "mse")
FisherType = Literal["exact", "sampled"]
_FISHER_TYPES = ("exact", "sampled")


class EkfacInfluence(TorchInfluenceFunctionModel):
    """K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) and EK-FAC (George
    et al. 2018; for influence: Grosse et al. 2023) for ``nn.Linear`` and ``nn.Conv2d`` layers,
    with cross-entropy or mean-squared-error losses.

    The Hessian of the mean training loss is replaced by its Gauss-Newton (Fisher) matrix, taken
    block-diagonal over layers. Each block is approximated in the eigenbasis ``Q_G ⊗ Q_A`` of the
    Kronecker factors ``A = E[a aᵀ]`` (layer inputs, with a constant 1 for the bias) and
    ``G = E[g gᵀ]`` (pseudo-gradients of the layer outputs). The eigenvalues in that basis are
    either the products ``λ_G,i · λ_A,j`` of the factors' eigenvalues (K-FAC,
    ``update_diagonal=False``) or are re-fitted to the exact diagonal of the Gauss-Newton matrix
    in that basis (EK-FAC, ``update_diagonal=True``: never a worse approximation in Frobenius
    norm, one more pass over the data). The expectation over the model's predictive
    distribution is exact (one backward pass per output class; deterministic) or estimated from
    sampled labels (``fisher="sampled"``).

    A solve costs two small matrix products per layer; memory is ``O(Σ out² + in²)`` over
    layers. For a single ``nn.Linear`` layer with MSE loss (linear regression) either variant is
    the exact inverse Hessian; on trained networks the block-diagonal and Kronecker
    approximations matter, and the more so the smaller ``λ``: the README's "Choosing a method"
    gives measured correlations with the influences of the exact generalized Gauss-Newton
    matrix (``SecondOrderMode.GENERALIZED_GAUSS_NEWTON``, the true Fisher for cross-entropy).

    Scores, factors and self-influences are computed layer by layer from each layer's inputs and
    output gradients (one forward and one backward pass per chunk; :mod:`.layers`), never from
    flat per-sample gradients; self-influences are ``Σ (Q_Gᵀ DW Q_A)² / (Λ + λ)`` in the
    eigenbasis. Inputs go in chunks sized from :attr:`memory_budget_bytes`. Samples must not
    interact in the forward pass (``eval()`` mode).

    Every trainable parameter must belong to an ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``,
    zero padding) layer, each called once per forward pass; freeze the others
    (``requires_grad_(False)``), e.g. BatchNorm layers in eval mode. As in pyDVL, a model with
    an unsupported layer is accepted at construction and :meth:`fit` raises
    :class:`UnsupportedLayerError`; :meth:`check_layers` raises it earlier on request.

    Args:
        model: the trained model (see :class:`TorchInfluenceFunctionModel`).
        update_diagonal: ``False`` (pyDVL's default) for K-FAC eigenvalues, ``True`` for EK-FAC's
            corrected ones. A loss function given here is taken as ``loss`` (the positional form
            ``EkfacInfluence(model, loss, λ)`` of earlier versions of this package, which
            fitted EK-FAC; it now gets K-FAC: pass ``loss=`` by keyword to choose the variant).
        hessian_regularization: ``λ ≥ 0`` added to the approximate Hessian's eigenvalues.
        progress: log each pass over the training data (at INFO level).
        loss: cross-entropy (the default, as in pyDVL; ``F.cross_entropy``,
            ``nn.CrossEntropyLoss``; outputs ``n × C``) or squared error (``F.mse_loss``,
            ``nn.MSELoss``); recognised by identity.
        regularization: alias of ``hessian_regularization``.
        loss_type: ``"cross_entropy"`` or ``"mse"`` for a loss not recognised by identity. For
            ``"mse"`` the loss must be a multiple of ``‖output − y‖²`` (its scale is measured).
        fisher: ``"exact"`` takes the expectation over the model's predictive distribution
            exactly (one backward pass per output class: deterministic); ``"sampled"`` draws
            ``fisher_samples`` labels per sample from it (Kronfluence's estimate: one backward
            pass per label, the faster choice for many classes; unbiased, seeded by ``seed``,
            the same labels in both passes over the data). For MSE, sampled columns are Gaussian.
        fisher_samples: labels drawn per sample with ``fisher="sampled"``.
        seed: seed of the sampled labels: per pass, one ``torch.Generator`` seeded with it
            draws ``torch.multinomial(softmax(outputs), fisher_samples, replacement=True)``
            batch after batch in the loader's order (chunk after chunk of a batch larger than
            :attr:`memory_budget_bytes` allows).

    Example:
        >>> model = EkfacInfluence(net, update_diagonal=True, hessian_regularization=1e-3)
        >>> model.fit(train_loader).influences(x_test, y_test, x_train, y_train).shape
        torch.Size([n_test, n_train])
    """

    # the eigenbases and eigenvalues do not depend on λ: a state loads under any λ
    _state_depends_on_regularization = False

    def __init__(
        self,
        model: nn.Module,
        update_diagonal: Union[bool, LossFunction] = False,
        hessian_regularization: Optional[float] = None,
        progress: bool = False,
        *,
        loss: Optional[LossFunction] = None,
        regularization: Optional[float] = None,
        loss_type: Optional[LossType] = None,
        fisher: FisherType = "exact",
        fisher_samples: int = 1,
        seed: int = 0,
    ):
        if callable(update_diagonal) and not isinstance(update_diagonal, (bool, np.bool_)):
            if loss is not None:
                raise InvalidParameterError(
                    "The loss was given twice: as the second positional argument and as loss=."
                )
            loss, update_diagonal = update_diagonal, False
        if not isinstance(update_diagonal, (bool, np.bool_)):
            raise InvalidParameterError(
                f"update_diagonal must be True (EK-FAC) or False (K-FAC), got {update_diagonal!r}."
            )
        super().__init__(
            model,
            F.cross_entropy if loss is None else loss,
            regularization,
            hessian_regularization=hessian_regularization,
        )
        self.update_diagonal = bool(update_diagonal)
        self.progress = bool(progress)
        self.loss_type = _loss_type(self.loss, loss_type)
        if fisher not in _FISHER_TYPES:
            raise InvalidParameterError(
                f"fisher must be one of {list(_FISHER_TYPES)}, got {fisher!r}."
            )
        self.fisher = fisher
        self.fisher_samples = positive_int(fisher_samples, "fisher_samples")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InvalidParameterError(f"seed must be an integer, got {seed!r}.")
        self.seed = int(seed)
        self._qa: list[Tensor] = []
        self._qg: list[Tensor] = []
        self._lambda: list[Tensor] = []
        self._extremes = (0.0, 0.0)

    @property
    def hessian_regularization(self) -> float:
        """pyDVL's name of :attr:`regularization`."""
        return self.regularization

    @hessian_regularization.setter
    def hessian_regularization(self, value: float) -> None:
        # the fitted eigenvalues serve any λ: a solve checks that λ keeps them invertible
        self.regularization = checked_regularization(value)
        blocks = getattr(self, "block_regularization", None)
        if blocks is not None:  # the one block's λ, kept in step
            self.block_regularization = {name: self.regularization for name in blocks}

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``model.named_modules()``) of the layers, the keys of the ``*_by_layer``
        results."""
        return [layer.name for layer in self._checked_layers()]

    def check_layers(self) -> None:
        """Raise the :class:`UnsupportedLayerError` that :meth:`fit` would raise for the model's
        layers; nothing when every trainable layer is supported."""
        self._checked_layers()

    def _find_layers(self) -> list[Layer]:
        return _ekfac_layers(self.model, self._fn.names, self._fn.numels)

    @property
    def _state_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        n = len(self._checked_layers())
        return tuple(f"layer{i}.{part}" for i in range(n) for part in ("QA", "QG", "lambda"))

    # -- fitting --------------------------------------------------------------------------------
    def fit(self, data: Any) -> "EkfacInfluence":
        self._checked_layers()  # an unsupported layer is refused before the data is read
        super().fit(data)
        return self

    def _fit(self, data: TrainingData) -> None:
        layers = self._checked_layers()
        kw = dict(dtype=self.dtype, device=self.device)
        started = time.perf_counter()
        a_sum = [torch.zeros(l.n_in, l.n_in, **kw) for l in layers]
        g_sum = [torch.zeros(l.n_out, l.n_out, **kw) for l in layers]
        for acts, columns in self._pseudo_gradients(data):
            for i, a in enumerate(acts):
                rows = a.reshape(-1, a.shape[-1])
                a_sum[i].addmm_(rows.T, rows, alpha=1.0 / a.shape[1])
            for grads in columns:
                for i, g in enumerate(grads):
                    rows = g.reshape(-1, g.shape[-1])
                    g_sum[i].addmm_(rows.T, rows)
        n = data.n_samples
        self._log_pass("Kronecker factors", n, started)
        self._qa, self._qg, eig_a, eig_g = [], [], [], []
        for i, layer in enumerate(layers):
            check_finite(a_sum[i], f"the input covariance of layer {layer.name!r}")
            check_finite(g_sum[i], f"the output-gradient covariance of layer {layer.name!r}")
            vals_a, qa = _eigh(a_sum[i] / n)
            vals_g, qg = _eigh(g_sum[i] / n)
            self._qa.append(qa)
            self._qg.append(qg)
            eig_a.append(vals_a)
            eig_g.append(vals_g)
        if self.update_diagonal:
            self._lambda = self._corrected_eigenvalues(data)
        else:
            self._lambda = [torch.outer(vg, va) for vg, va in zip(eig_g, eig_a)]
        for layer, lam in zip(layers, self._lambda):
            check_finite(lam, f"the eigenvalues of layer {layer.name!r}")
        self._extremes = _extremes(self._lambda)

    def _corrected_eigenvalues(self, data: TrainingData) -> list[Tensor]:
        """EK-FAC's eigenvalues: the Gauss-Newton matrix's diagonal in the basis ``Q_G ⊗ Q_A``,
        i.e. the mean over samples and output columns of ``(Q_Gᵀ DW Q_A)²`` entrywise."""
        started = time.perf_counter()
        kw = dict(dtype=self.dtype, device=self.device)
        lambdas = [torch.zeros(l.n_out, l.n_in, **kw) for l in self._layers]
        rotations = list(zip(self._qa, self._qg))
        for acts, columns in self._pseudo_gradients(data):
            rotated = [_Rotation(a, qa, qg) for a, (qa, qg) in zip(acts, rotations)]
            for grads in columns:
                for i, g in enumerate(grads):
                    lambdas[i] += rotated[i].squared_sum(g, self._budget)
        self._log_pass("corrected eigenvalues", data.n_samples, started)
        return [lam / data.n_samples for lam in lambdas]

    def _log_pass(self, what: str, n: Optional[int], started: float) -> None:
        if self.progress:
            logger.info(
                "EkfacInfluence: %s from %d samples in %.2f s",
                what,
                n,
                time.perf_counter() - started,
            )

    def _pseudo_gradients(self, data: TrainingData):
        """Per batch: every layer's activations (``n × T × n_in``), and an iterator over the
        pseudo-gradients of every layer's output (``n × T × out``): for each column ``c`` of
        ``L`` (``H_out = L Lᵀ``, exact expectation) or each sampled label (``fisher='sampled'``)
        the gradient of ``⟨output, column⟩``. Consume the iterator before asking for the next
        batch. The sampled labels are drawn from one generator seeded with :attr:`seed` per
        pass, so every pass (and every fit) sees the same labels."""
        layers = self._layers
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        for batch_x, batch_y in data:
            # a batch larger than the memory budget allows goes in chunks (the sums are the same)
            step = self._chunk_rows(batch_x, batch_y, fitting=True)
            for s in range(0, batch_x.shape[0], step):
                x, y = batch_x[s : s + step], batch_y[s : s + step]
                out, inputs, outputs = forward_recorded(self.model, layers, x)
                acts = [layer.activations(seen) for layer, seen in zip(layers, inputs)]
                columns = self._output_factor_columns(out.detach(), y, generator)
                yield acts, self._column_grads(out, outputs, columns)

    def _column_grads(self, out: Tensor, layer_outs: list[Tensor], columns: Iterator[Tensor]):
        pending = list(columns)
        for c, col in enumerate(pending):
            grads = output_grads_of(out, layer_outs, col, retain_graph=c < len(pending) - 1)
            yield [layer.output_grads(g) for layer, g in zip(self._layers, grads)]

    def _output_factor_columns(
        self, out: Tensor, y: Tensor, generator: Optional[torch.Generator] = None
    ) -> Iterator[Tensor]:
        """Columns (each shaped like ``out``) whose outer products sum to the Hessian of one
        sample's loss with respect to its output (for all samples at once): exactly, one per
        output class, or in expectation, one per sampled label."""
        if self.loss_type == "cross_entropy":
            if out.ndim != 2:
                raise NotImplementedError(
                    "EkfacInfluence supports cross-entropy on outputs of shape (n, n_classes); "
                    f"the model returns shape {tuple(out.shape)}."
                )
            p = torch.softmax(out, dim=1)
            if self.fisher == "sampled":
                labels = torch.multinomial(
                    p, self.fisher_samples, replacement=True, generator=generator
                )
                scale = self.fisher_samples**-0.5
                for s in range(self.fisher_samples):
                    # the logit gradient of cross-entropy with a label drawn from the model
                    yield scale * (p - F.one_hot(labels[:, s], out.shape[1]).to(p.dtype))
                return
            sqrt_p = p.sqrt()
            eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
            for c in range(out.shape[1]):
                # sqrt(p_c) (e_c − p): sqrt(p_c) times the logit gradient of CE with label c
                yield sqrt_p[:, c : c + 1] * (eye[c] - p)
            return
        root = self._mse_scale(out, y) ** 0.5
        flat = out.reshape(out.shape[0], -1)
        if self.fisher == "sampled":
            # Gaussian columns: E[ε εᵀ] = I, so the columns' outer products average to s·I
            scale = root * self.fisher_samples**-0.5
            for _ in range(self.fisher_samples):
                eps = torch.randn(
                    flat.shape, generator=generator, dtype=out.dtype, device=out.device
                )
                yield (scale * eps).reshape(out.shape)
            return
        for c in range(flat.shape[1]):
            col = torch.zeros_like(flat)
            col[:, c] = root
            yield col.reshape(out.shape)

    def _mse_scale(self, out: Tensor, y: Tensor) -> float:
        """``s`` with ``∇²_out ℓ = s·I`` for one sample, measured (``2/d`` for a mean MSE)."""
        o, t = out[:1].detach().requires_grad_(True), y[:1]
        v = torch.ones_like(o) / o.numel() ** 0.5
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.loss(o, t), o, create_graph=True)
            (hv,) = torch.autograd.grad(g, o, grad_outputs=v, allow_unused=True)
        hv = torch.zeros_like(o) if hv is None else hv.detach()
        scale = float((hv * v).sum())
        if not torch.allclose(hv, scale * v, rtol=1e-5, atol=1e-8) or not scale > 0:
            raise InfluenceInputError(
                "loss_type='mse' needs a loss proportional to the squared error ‖output − y‖² "
                "(like F.mse_loss); the given loss's second derivative is not a positive "
                "multiple of the identity."
            )
        return scale

    def _check_regularization(self, regularization: float) -> None:
        """Refuse a ``λ`` that leaves the approximation singular. Checked by each solve, not by
        ``fit``: the fit does not depend on ``λ`` (pyDVL's default is 0, and
        :meth:`explore_hessian_regularization` tries several on one fit)."""
        # the solve divides entrywise by λ_i + λ (no p × p factorization, whose rounding would
        # grow with p): only entries that are zero at the precision of the largest are singular
        low, high = self._extremes
        largest, smallest = high, low + regularization
        scale = max(largest + regularization, torch.finfo(self.dtype).tiny)
        if smallest <= scale * torch.finfo(self.dtype).eps:
            variant = "EK-FAC" if self.update_diagonal else "K-FAC"
            raise InvalidRegularizationError(
                f"The {variant} Hessian approximation + λI is singular (smallest eigenvalue "
                f"{smallest:.3g}, largest {scale:.3g}) with regularization={regularization}; "
                "increase the regularization."
            )

    # -- solving --------------------------------------------------------------------------------
    def _solve(self, rhs: Tensor, regularization: Optional[float] = None) -> Tensor:
        reg = self.regularization if regularization is None else regularization
        self._check_regularization(reg)
        out = torch.empty_like(rhs)
        for layer, qa, qg, lam in zip(self._layers, self._qa, self._qg, self._lambda):
            v = layer.to_matrix(rhs)  # k × out × n_in
            rotated = qg.T @ v @ qa
            rotated = rotated / (lam + reg)
            layer.from_matrix(qg @ rotated @ qa.T, out)
        return out

    # -- layer-wise fast paths ------------------------------------------------------------------
    def self_influences_from_terms(self, terms: LayerTerms) -> Tensor:
        """:meth:`self_influences` of a batch given by its :meth:`layer_terms`."""
        self._require_fitted()
        reg = self.regularization
        self._check_regularization(reg)
        result = torch.zeros(terms.n, dtype=self.dtype, device=self.device)
        # a layer's unfolded inputs of every row at once can exceed the terms themselves (a
        # 3 × 3 convolution: nine times its inputs), so rows go in chunks: half the budget for
        # those copies, half for the rotated gradients formed from them
        largest = max(self._unfolded_widths(terms))
        step = max(1, self._budget // 2 // (2 * largest * self.dtype.itemsize))  # and rotated
        for s in range(0, terms.n, step):
            part = terms.rows(s, s + step)
            for layer, inputs, out_grads, qa, qg, lam in zip(
                self._layers, part.inputs, part.out_grads, self._qa, self._qg, self._lambda
            ):
                rotation = _Rotation(layer.activations(inputs), qa, qg)
                result[s : s + step] += rotation.weighted_squares(
                    layer.output_grads(out_grads), 1.0 / (lam + reg), self._budget // 2
                )
        return result

    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        reg = self.regularization
        self._check_regularization(reg)
        out = torch.empty(x.shape[0], self.n_parameters, dtype=self.dtype, device=self.device)
        for rows, terms in self._term_chunks(x, y, factors=True):
            for layer, qa, qg, pre in self._preconditioned(terms, reg):
                layer.from_matrix(qg @ pre @ qa.T, out[rows])
        return out

    def _term_chunks(
        self, x: Tensor, y: Tensor, factors: bool = False
    ) -> Iterator[tuple[slice, LayerTerms]]:
        """The batch's layer terms, chunk by chunk within the memory budget."""
        step = self._chunk_rows(x, y, factors=factors)
        for s in range(0, x.shape[0], step):
            terms = self._capture(x[s : s + step], y[s : s + step])
            check_finite_terms(terms)
            yield slice(s, s + step), terms

    def _preconditioned(
        self, terms: LayerTerms, reg: float
    ) -> Iterator[tuple[Layer, Tensor, Tensor, Tensor]]:
        """Per layer: the layer, ``Q_A``, ``Q_G`` and the batch's preconditioned gradients in
        the eigenbasis, ``(Q_Gᵀ DW Q_A) / (Λ + λ)`` (``n × out × n_in``)."""
        for layer, inputs, out_grads, qa, qg, lam in zip(
            self._layers, terms.inputs, terms.out_grads, self._qa, self._qg, self._lambda
        ):
            rotation = _Rotation(layer.activations(inputs), qa, qg)
            yield layer, qa, qg, rotation.rotated(layer.output_grads(out_grads)) / (lam + reg)

    def influences(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> Tensor:
        """Influences of the test batch on the training batch (the test batch itself if
        omitted). In Up mode without flat factors: a layer with one position per sample (a
        Linear layer on vectors) is scored in the eigenbasis, where a training gradient
        ``g aᵀ`` rotates cheaply (``Q_Gᵀg``, ``Q_Aᵀa``) and the test side needs no rotation
        back; the other layers against the test factors rotated back once."""
        mode = InfluenceMode.parse(mode)
        if mode is not InfluenceMode.Up or (x is None) != (y is None):
            return super().influences(x_test, y_test, x, y, mode)
        self._require_fitted()
        x_test, y_test = self._prepare(x_test, y_test, "input")
        if x is None:
            x, y = x_test, y_test
        else:
            x, y = self._prepare(x, y, "training input")
        reg = self.regularization
        self._check_regularization(reg)
        test_sides = self._test_sides(x_test, y_test, reg)
        result = torch.empty(x_test.shape[0], x.shape[0], dtype=self.dtype, device=self.device)
        for rows, terms in self._term_chunks(x, y):
            part = result[:, rows]
            part.zero_()
            for layer, inputs, out_grads, qa, qg, (in_eigenbasis, side) in zip(
                self._layers, terms.inputs, terms.out_grads, self._qa, self._qg, test_sides
            ):
                if in_eigenbasis:
                    gq = layer.output_grads(out_grads)[:, 0] @ qg
                    aq = layer.activations(inputs)[:, 0] @ qa
                    _add_rank_one_scores(side, gq, aq, self._budget, part)
                else:
                    source, w_cols, b_cols = _flat_layout(layer, side)
                    add_layer_scores(
                        layer, source, w_cols, b_cols, inputs, out_grads, self._budget, part
                    )
        return result

    def _test_sides(self, x: Tensor, y: Tensor, reg: float) -> list[tuple[bool, Tensor]]:
        """Per layer, the test batch's preconditioned gradients ``(Q_Gᵀ DW Q_A) / (Λ + λ)``:
        kept in the eigenbasis (``True``) for layers with one position per sample, rotated
        back (``False``: the layer's factors, ``k × out × n_in``) for the others."""
        sides: list[list[Tensor]] = [[] for _ in self._layers]
        eigenbasis: list[bool] = []
        for _, terms in self._term_chunks(x, y, factors=True):
            eigenbasis = [
                layer.positions(inputs, grads) == 1
                for layer, inputs, grads in zip(self._layers, terms.inputs, terms.out_grads)
            ]
            for i, (_, qa, qg, pre) in enumerate(self._preconditioned(terms, reg)):
                sides[i].append(pre if eigenbasis[i] else qg @ pre @ qa.T)
        return [(e, torch.cat(parts)) for e, parts in zip(eigenbasis, sides)]

    def influences_from_factors(
        self,
        z_test_factors: Tensor,
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> Tensor:
        mode = InfluenceMode.parse(mode)
        if mode is not InfluenceMode.Up:
            return super().influences_from_factors(z_test_factors, x, y, mode)
        self._require_fitted()
        factors = self._prepare_factors(z_test_factors)
        x, y = self._prepare(x, y, "training input")
        result = torch.empty(factors.shape[0], x.shape[0], dtype=self.dtype, device=self.device)
        for rows, terms in self._term_chunks(x, y):
            part = result[:, rows]
            part.zero_()
            layer_scores(self._layers, factors, terms, self._budget, out=part)
        return result

    def self_influences(self, x: Tensor, y: Tensor) -> Tensor:
        """``⟨H⁻¹∇θℓ(z_i), ∇θℓ(z_i)⟩`` for every sample, layer by layer in the eigenbasis:
        ``Σ (Q_Gᵀ DW Q_A)² / (Λ + λ)``, without flat gradients or factors; inputs go in
        chunks sized from :attr:`memory_budget_bytes`."""
        self._require_fitted()
        x, y = self._prepare(x, y, "input")
        return torch.cat(
            [self.self_influences_from_terms(terms) for _, terms in self._term_chunks(x, y)]
        )

    # -- results by layer -----------------------------------------------------------------------
    def influence_factors_by_layer(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """:meth:`influence_factors` split by layer: ``{layer name: n × p_layer}``, each the
        layer's columns of the flat factors (weight then bias), in the model's layer order.
        The solve is block-diagonal over layers, so each is that layer's own block solve."""
        return self._split_by_layer(self.influence_factors(x, y))

    def influences_from_factors_by_layer(
        self,
        z_test_factors: Mapping[str, Tensor],
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """:meth:`influences_from_factors` for factors by layer (as
        :meth:`influence_factors_by_layer` returns them): one influence tensor per layer,
        summing to the influences of the whole factors."""
        self._require_fitted()
        mode = InfluenceMode.parse(mode)
        factors = self._prepare_layer_factors(z_test_factors)
        x, y = self._prepare(x, y, "training input")
        return self._layer_influences(factors, x, y, mode)

    def influences_by_layer(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> dict[str, Tensor]:
        """:meth:`influences` by layer: ``{layer name: influences through that layer's
        parameters}``, summing to :meth:`influences` (the training batch is the test batch
        itself if omitted)."""
        self._require_fitted()
        mode = InfluenceMode.parse(mode)
        if (x is None) != (y is None):
            missing = "x" if x is None else "y"
            raise InfluenceInputError(
                f"Pass both training inputs x and labels y, or neither; {missing} is missing."
            )
        x_test, y_test = self._prepare(x_test, y_test, "input")
        test_grads = self._fn.per_sample_grads(x_test, y_test)
        factors = [f for f in self._split_by_layer(self._solve(test_grads)).values()]
        if x is None:
            x, y, grads = x_test, y_test, test_grads  # the gradients are computed once
        else:
            x, y = self._prepare(x, y, "training input")
            grads = None
        return self._layer_influences(factors, x, y, mode, grads)

    def explore_hessian_regularization(
        self, x: Tensor, y: Tensor, regularization_values: Iterable[float]
    ) -> dict[float, dict[str, Tensor]]:
        """Up-weighting influences of the batch on itself, by layer, for each regularization
        value: ``{λ: {layer name: n × n}}``. The gradients are computed once and the fitted
        eigenvalues serve every ``λ`` (they do not depend on it); the model's own
        :attr:`regularization` is left unchanged."""
        self._require_fitted()
        if isinstance(regularization_values, (str, bytes)) or not isinstance(
            regularization_values, collections.abc.Iterable
        ):
            raise InvalidParameterError(
                "regularization_values must be an iterable of numbers ≥ 0, got "
                f"{type(regularization_values).__name__}."
            )
        values = [checked_regularization(v) for v in regularization_values]
        for reg in values:
            self._check_regularization(reg)
        x, y = self._prepare(x, y, "input")
        grads = self._fn.per_sample_grads(x, y)
        indices = [layer.indices(grads.device) for layer in self._layers]
        result: dict[float, dict[str, Tensor]] = {}
        for reg in values:
            factors = self._solve(grads, reg)
            result[reg] = {
                layer.name: factors[:, idx] @ grads[:, idx].T
                for layer, idx in zip(self._layers, indices)
            }
        return result

    def _split_by_layer(self, full: Tensor) -> dict[str, Tensor]:
        return {layer.name: full[:, layer.indices(full.device)] for layer in self._layers}

    def _layer_influences(
        self,
        factors: list[Tensor],
        x: Tensor,
        y: Tensor,
        mode: InfluenceMode,
        grads: Optional[Tensor] = None,
    ) -> dict[str, Tensor]:
        """Influences of per-layer factors (aligned with the layers) on the batch ``(x, y)``."""
        indices = [layer.indices(self.device) for layer in self._layers]
        if mode is InfluenceMode.Up:
            grads = self._fn.per_sample_grads(x, y) if grads is None else grads
            return {
                layer.name: f @ grads[:, idx].T
                for layer, f, idx in zip(self._layers, factors, indices)
            }
        # each layer's factors padded to the full vector (zeros elsewhere), all layers stacked:
        # one Jacobian pass gives every layer's products
        k = factors[0].shape[0]
        padded = torch.zeros(
            len(factors) * k, self.n_parameters, dtype=self.dtype, device=self.device
        )
        for i, (f, idx) in enumerate(zip(factors, indices)):
            padded[i * k : (i + 1) * k, idx] = f
        products = self._fn.mixed_products(padded, x, y)
        return {layer.name: products[i * k : (i + 1) * k] for i, layer in enumerate(self._layers)}

    def _prepare_layer_factors(self, factors: Any) -> list[Tensor]:
        """Check factors by layer (keys: the layer names; values: ``k × p_layer``, one ``k``)
        and return them in layer order, on the model's device and dtype."""
        if not isinstance(factors, collections.abc.Mapping):
            raise InfluenceInputError(
                "z_test_factors must be a dict {layer name: factors}, as "
                f"influence_factors_by_layer returns it; got {type(factors).__name__}."
            )
        names = [layer.name for layer in self._layers]
        if set(factors) != set(names):
            raise InfluenceInputError(
                f"z_test_factors has the layers {sorted(factors)}, but the model's are {names}."
            )
        out, rows = [], None
        for layer in self._layers:
            f = factors[layer.name]
            if not isinstance(f, Tensor):
                f = torch.as_tensor(np.asarray(f))
            width = layer.indices(self.device).numel()
            if f.ndim != 2 or f.shape[1] != width or (rows is not None and f.shape[0] != rows):
                expected = f"({'n_test' if rows is None else rows}, {width})"
                raise ShapeMismatchError(
                    f"z_test_factors[{layer.name!r}] must have shape {expected}, got "
                    f"{tuple(f.shape)}."
                )
            rows = f.shape[0]
            check_finite(f, f"z_test_factors[{layer.name!r}]")
            out.append(f.to(device=self.device, dtype=self.dtype))
        return out

    # -- fitted state ---------------------------------------------------------------------------
    def _get_state(self) -> dict[str, Tensor]:
        # the variant is recorded (not a state key, so states exported before it load)
        state = {"update_diagonal": torch.tensor(int(self.update_diagonal), dtype=torch.int64)}
        for i, (qa, qg, lam) in enumerate(zip(self._qa, self._qg, self._lambda)):
            state.update({f"layer{i}.QA": qa, f"layer{i}.QG": qg, f"layer{i}.lambda": lam})
        return state

    def load_fitted_state(self, state: dict[str, Any]) -> "EkfacInfluence":
        if (
            "update_diagonal" in state
            and bool(int(state["update_diagonal"])) != self.update_diagonal
        ):
            names = {False: "K-FAC (update_diagonal=False)", True: "EK-FAC (update_diagonal=True)"}
            raise FittedStateError(
                f"The fitted state holds {names[not self.update_diagonal]} eigenvalues, but this "
                f"model is {names[self.update_diagonal]}."
            )
        super().load_fitted_state(state)
        return self

    def _set_state(self, state: dict[str, Tensor]) -> None:
        qa, qg, lam = [], [], []
        for i, layer in enumerate(self._checked_layers()):
            expected = {
                "QA": (layer.n_in, layer.n_in),
                "QG": (layer.n_out, layer.n_out),
                "lambda": (layer.n_out, layer.n_in),
            }
            for part, shape in expected.items():
                got = tuple(state[f"layer{i}.{part}"].shape)
                if got != shape:
                    raise FittedStateError(
                        f"The fitted state's layer{i}.{part} has shape {got}, but layer "
                        f"{layer.name!r} needs {shape}; was it exported from another model?"
                    )
            qa.append(state[f"layer{i}.QA"].to(self.dtype))
            qg.append(state[f"layer{i}.QG"].to(self.dtype))
            lam.append(state[f"layer{i}.lambda"].to(self.dtype))
        self._qa, self._qg, self._lambda = qa, qg, lam
        self._extremes = _extremes(lam)


def _extremes(lambdas: list[Tensor]) -> tuple[float, float]:
    """Smallest and largest eigenvalue over the layers (read once, not at every solve)."""
    return min(float(lam.min()) for lam in lambdas), max(float(lam.max()) for lam in lambdas)


def _loss_type(loss: LossFunction, loss_type: Optional[str]) -> str:
    if loss_type is not None:
        if loss_type not in _LOSS_TYPES:
            raise InvalidParameterError(
                f"loss_type must be one of {list(_LOSS_TYPES)} or None, got {loss_type!r}."
            )
        detected = loss_type
    elif loss is F.cross_entropy or isinstance(loss, nn.CrossEntropyLoss):
        detected = "cross_entropy"
    elif loss is F.mse_loss or isinstance(loss, nn.MSELoss):
        detected = "mse"
    else:
        raise NotImplementedError(
            f"EkfacInfluence supports cross-entropy and mean-squared-error losses and did not "
            f"recognise {getattr(loss, '__name__', type(loss).__name__)!r}; pass "
            "loss_type='cross_entropy' or loss_type='mse' if the loss is one of them."
        )
    if isinstance(loss, nn.CrossEntropyLoss) and loss.weight is not None:
        raise NotImplementedError(
            "EkfacInfluence does not support class weights in nn.CrossEntropyLoss."
        )
    return detected


def _ekfac_layers(model: nn.Module, names: list[str], numels: list[int]) -> list[Layer]:
    """The model's layers, refusing those EK-FAC's Kronecker factors do not cover."""
    layers = find_layers(model, names, numels)
    for layer in layers:
        if layer.groups != 1:
            raise UnsupportedLayerError(
                f"EkfacInfluence supports nn.Conv2d with groups=1; layer {layer.name!r} "
                f"(Conv2d) has groups={layer.groups}."
            )
    return layers


def _eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (clamped at 0: the factors are positive semi-definite, a negative value is
    rounding) and eigenvectors of a symmetric matrix, decomposed in float64 so that the
    smallest eigenvalues, which small λ expose, are not lost to float32 rounding."""
    sym = 0.5 * (m + m.T)
    vals, vecs = torch.linalg.eigh(sym.to(torch.float64))
    return vals.clamp_min(0).to(m.dtype), vecs.to(m.dtype)


class _Rotation:
    """One layer's per-sample gradients ``Σ_t g_t a_tᵀ`` in the eigenbasis, ``Q_Gᵀ · Q_A``,
    for a batch whose inputs ``a`` (``n × T × n_in``) are fixed while output gradients vary.

    Either the inputs and each output gradient are rotated before their product, or the
    product is formed and then rotated, whichever costs fewer operations; with one position
    the rotated gradient is the outer product of the rotated factors and is never formed for
    sums of squares."""

    def __init__(self, a: Tensor, qa: Tensor, qg: Tensor):
        self.a, self.qa, self.qg = a, qa, qg
        n_in, out = qa.shape[0], qg.shape[0]
        self.positions = a.shape[1]
        self.rotate_first = self.positions * (n_in * n_in + out * out) <= out * n_in * (out + n_in)
        self.aq = a @ qa if self.rotate_first else None

    def rotated(self, g: Tensor, rows: slice = slice(None)) -> Tensor:
        """``n × out × n_in`` rotated gradients of the samples ``rows``."""
        if self.rotate_first:
            return torch.bmm((g[rows] @ self.qg).transpose(1, 2), self.aq[rows])
        dw = torch.bmm(g[rows].transpose(1, 2), self.a[rows])
        return self.qg.T @ dw @ self.qa

    def _steps(self, n: int, budget: int) -> Iterator[slice]:
        per_sample = 2 * self.qg.shape[0] * self.qa.shape[0] * self.a.element_size()
        step = max(1, budget // max(1, per_sample))
        return (slice(s, s + step) for s in range(0, n, step))

    def squared_sum(self, g: Tensor, budget: int) -> Tensor:
        """``Σ_n rotated_n²`` entrywise (``out × n_in``)."""
        if self.positions == 1:
            gq = g[:, 0] @ self.qg
            return gq.square().T @ self.aq[:, 0].square()
        total = None
        for rows in self._steps(g.shape[0], budget):
            part = self.rotated(g, rows).square().sum(dim=0)
            total = part if total is None else total + part
        return total

    def weighted_squares(self, g: Tensor, weights: Tensor, budget: int) -> Tensor:
        """``Σ_{o,i} rotated_n[o, i]² · weights[o, i]`` for every sample (``n``)."""
        if self.positions == 1:
            gq = g[:, 0] @ self.qg
            return ((gq.square() @ weights) * self.aq[:, 0].square()).sum(dim=1)
        parts = [
            (self.rotated(g, rows).square() * weights).sum(dim=(1, 2))
            for rows in self._steps(g.shape[0], budget)
        ]
        return torch.cat(parts)


def _flat_layout(
    layer: Layer, side: Tensor
) -> tuple[TensorColumns, Optional[slice], Optional[slice]]:
    """A layer's ``k × out × n_in`` matrices as flat-vector columns: the weight row-major,
    then the bias; with the column ranges of each part."""
    k, w = side.shape[0], layer.n_weight_cols
    parts, w_cols, b_cols, width = [], None, None, 0
    if layer.weight is not None:
        parts.append(side[:, :, :w].reshape(k, -1))
        w_cols, width = slice(0, layer.n_out * w), layer.n_out * w
    if layer.bias is not None:
        parts.append(side[:, :, w])
        b_cols = slice(width, width + layer.n_out)
    return TensorColumns(torch.cat(parts, dim=1)), w_cols, b_cols


def _add_rank_one_scores(side: Tensor, gq: Tensor, aq: Tensor, budget: int, result: Tensor) -> None:
    """Add ``Σ_{o,i} side_k[o, i] · gq_n[o] · aq_n[i]`` to ``result`` (``k × n``): scores of
    preconditioned test gradients against rank-one training gradients, both in the
    eigenbasis."""
    k, n_out, n_in = side.shape
    rows = side.reshape(k * n_out, n_in)
    step = max(1, budget // max(1, k * n_out * side.element_size()))
    for s in range(0, gq.shape[0], step):
        fa = (aq[s : s + step] @ rows.T).reshape(-1, k, n_out)
        result[:, s : s + step] += torch.bmm(fa, gq[s : s + step].unsqueeze(2))[:, :, 0].T
