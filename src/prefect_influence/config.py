"""The one configuration of an influence job: a pydantic model that validates parameters and
renders as the run form of a Prefect deployment (titles, descriptions, enums, defaults).

Its fields come in three sections: :class:`JobSpec` (what is computed: fingerprinted as a
whole), :class:`OutputSpec` (where results go and which are written) and :class:`RunOptions`
(how one run behaves)."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .base import InfluenceMode

__all__ = [
    "Method",
    "LossName",
    "DType",
    "DeviceName",
    "PreconditionerName",
    "SecondOrderName",
    "BlockModeName",
    "TrainFeatures",
    "ModelSpec",
    "DataSpec",
    "MethodSpec",
    "JobSpec",
    "OutputSpec",
    "RunOptions",
    "PipelineConfig",
    "QuerySpec",
    "BUILTIN",
]

#: the built-in example (digits classifier with flipped labels), usable as model and data
BUILTIN = "builtin:digits"

_SECRET_KEYS = ("key", "secret", "token", "password", "credential", "session")


class Method(str, Enum):
    direct = "direct"
    cg = "cg"
    lissa = "lissa"
    arnoldi = "arnoldi"
    nystroem = "nystroem"
    ekfac = "ekfac"
    datainf = "datainf"


class FisherName(str, Enum):
    """How EK-FAC takes the Fisher's expectation over labels (``EkfacInfluence(fisher=...)``)."""

    exact = "exact"
    sampled = "sampled"


class SecondOrderName(str, Enum):
    """The curvature matrix in place of the Hessian (see ``prefect_influence.torch``'s
    ``SecondOrderMode``)."""

    hessian = "hessian"
    gauss_newton = "gauss_newton"
    generalized_gauss_newton = "generalized_gauss_newton"


class BlockModeName(str, Enum):
    """Diagonal blocks of the Hessian (see ``prefect_influence.torch``'s ``BlockMode``)."""

    full = "full"
    layer_wise = "layer_wise"
    parameter_wise = "parameter_wise"


class LossName(str, Enum):
    cross_entropy = "cross_entropy"
    mse = "mse"


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class DeviceName(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class TrainFeatures(str, Enum):
    none = "none"
    exact = "exact"
    projected = "projected"


#: default dimension of projected train features (see docs/pipeline.md#queries for the
#: measured error as a function of the dimension)
DEFAULT_PROJECTION_DIM = 1024


class PreconditionerName(str, Enum):
    none = "none"
    jacobi = "jacobi"
    nystroem = "nystroem"


class _Section(BaseModel):
    # python-re: the output pattern uses look-ahead (Python, jsonschema and the UI's JavaScript
    # all support it; pydantic's default Rust engine does not)
    model_config = ConfigDict(extra="forbid", use_enum_values=False, regex_engine="python-re")


class ModelSpec(_Section):
    factory: str = Field(
        BUILTIN,
        title="Model factory",
        description="Import path 'package.module:function' of a function returning the "
        "untrained nn.Module, or 'builtin:digits' for the built-in example. Import paths run "
        "code: a configuration is trusted.",
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        title="Factory arguments",
        description="Keyword arguments for the factory.",
    )
    checkpoint: Optional[str] = Field(
        None,
        title="Checkpoint URL",
        description="fsspec URL of the trained state_dict (torch.save), loaded with "
        "weights_only=True. Empty for the built-in example (trained on the fly, seeded).",
    )
    loss: str = Field(
        LossName.cross_entropy.value,
        title="Loss",
        description="'cross_entropy', 'mse', or an import path 'module:function' of "
        "loss(outputs, targets) -> scalar.",
    )


class DataSpec(_Section):
    train: str = Field(
        BUILTIN,
        title="Training data",
        description="fsspec URL of a zarr group (or directory of x.npy/y.npy, or a .npz file) "
        "with arrays 'x' and 'y'; or 'module:function' returning a torch Dataset of (x, y); or "
        "'builtin:digits'.",
    )
    test: str = Field(
        BUILTIN,
        title="Test data",
        description="Same forms as the training data.",
    )


class MethodSpec(_Section):
    name: Method = Field(
        Method.arnoldi, title="Method", description="How the inverse Hessian is approximated."
    )
    regularization: float = Field(
        0.01, ge=0, title="Regularization", description="λ added to the Hessian diagonal (H + λI)."
    )
    rank: int = Field(50, ge=1, title="Rank", description="Rank for arnoldi and nystroem.")
    krylov_dimension: Optional[int] = Field(
        None, ge=1, title="Krylov dimension", description="Lanczos subspace size (arnoldi)."
    )
    rtol: float = Field(1e-6, gt=0, title="Relative tolerance", description="cg and lissa.")
    atol: float = Field(1e-8, ge=0, title="Absolute tolerance", description="cg.")
    maxiter: Optional[int] = Field(
        None,
        ge=1,
        title="Max iterations",
        description="cg (default 10·n_parameters); lissa (default 1000).",
    )
    preconditioner: PreconditionerName = Field(
        PreconditionerName.none, title="CG preconditioner", description="Preconditioner for cg."
    )
    preconditioner_rank: int = Field(
        10, ge=1, title="Preconditioner rank", description="nystroem preconditioner."
    )
    lissa_scale: float = Field(
        10.0, gt=0, title="LiSSA scale", description="Must exceed λ_max(H + λI)."
    )
    lissa_dampen: float = Field(
        0.0,
        ge=0,
        title="LiSSA dampening",
        description="d in h ← b + (1 − d)·h − (H + λI)h / scale (lissa): adds scale·d to λ, more "
        "stable but biased.",
    )
    fit_batch_size: int = Field(
        256, ge=1, title="Fit batch size", description="Training samples per batch while fitting."
    )
    second_order_mode: SecondOrderName = Field(
        SecondOrderName.hessian,
        title="Curvature",
        description="hessian; gauss_newton: mean outer product of the per-sample gradients "
        "(pyDVL's); generalized_gauss_newton: Jᵀ·H_out·J. Not for ekfac or datainf.",
    )
    block_structure: Union[BlockModeName, dict[str, list[str]]] = Field(
        BlockModeName.full,
        title="Hessian blocks",
        description="full, layer_wise, parameter_wise, or a mapping of block names to parameter "
        "names (block-diagonal approximation). Not for ekfac.",
    )

    fisher: FisherName = Field(
        FisherName.exact,
        title="EK-FAC Fisher",
        description="ekfac: exact (expectation over every class: one backward pass per class) "
        "or sampled (seeded labels drawn from the model: one pass per sample, faster for many "
        "classes).",
    )
    fisher_samples: int = Field(
        1, ge=1, title="EK-FAC sampled labels", description="ekfac, sampled: labels per sample."
    )
    fisher_seed: int = Field(
        0, title="EK-FAC sampling seed", description="ekfac, sampled: seed of the labels."
    )

    @model_validator(mode="after")
    def _combinations(self) -> "MethodSpec":
        name = self.name.value
        if self.name is not Method.ekfac and (
            self.fisher is not FisherName.exact or self.fisher_samples != 1 or self.fisher_seed
        ):
            raise ValueError("fisher, fisher_samples and fisher_seed are for ekfac only")
        if self.name is Method.ekfac and self.block_structure != BlockModeName.full:
            raise ValueError("ekfac works layer by layer already; block_structure must be full")
        if self.name in (Method.ekfac, Method.datainf) and (
            self.second_order_mode is not SecondOrderName.hessian
        ):
            raise ValueError(f"{name} fixes its own curvature; leave second_order_mode: hessian")
        if self.name is Method.datainf and self.regularization <= 0:
            raise ValueError("datainf needs regularization > 0 (it divides by it)")
        return self

    def fingerprinted(self) -> dict[str, Any]:
        """The settings as the output's fingerprint records them: curvature and blocks only
        when not the defaults, so outputs written before they existed keep their fingerprint."""
        settings = self.model_dump(mode="json")
        if self.second_order_mode is SecondOrderName.hessian:
            del settings["second_order_mode"]
        if self.block_structure == BlockModeName.full:
            del settings["block_structure"]
        if self.fisher is FisherName.exact:
            for key in ("fisher", "fisher_samples", "fisher_seed"):
                del settings[key]
        return settings


ChunkSize = Union[Literal["auto"], Annotated[int, Field(ge=1)]]  # bounds in the JSON schema too


class JobSpec(_Section):
    """What a job computes: every field determines the stored numbers and enters the output's
    fingerprint (the model and data by content, chunk sizes as resolved); changing one on an
    existing output is refused unless ``overwrite``."""

    model: ModelSpec = Field(
        default_factory=ModelSpec, title="Model", description="The trained network and its loss."
    )
    data: DataSpec = Field(
        default_factory=DataSpec,
        title="Data",
        description="Where the training and test samples are.",
    )
    method: MethodSpec = Field(
        default_factory=MethodSpec,
        title="Influence method",
        description="How the inverse Hessian is approximated, and its settings.",
    )
    mode: InfluenceMode = Field(
        InfluenceMode.Up,
        title="Mode",
        description="'up' (n_test × n_train) or 'perturbation' (n_test × n_train × input shape).",
    )
    test_chunk_size: ChunkSize = Field(
        "auto", title="Test chunk size", description="Test samples per chunk, or 'auto'."
    )
    train_chunk_size: ChunkSize = Field(
        "auto",
        title="Train chunk size",
        description="Training samples per chunk, or 'auto' "
        "(sized so Prefect's per-task overhead stays ≤ 10% of compute).",
    )
    dtype: DType = Field(DType.float32, title="Dtype", description="Computation and storage dtype.")
    device: DeviceName = Field(
        DeviceName.cpu,
        title="Device",
        description="Torch device of the computation ('cuda' needs a GPU on every Dask worker).",
    )

    @field_validator("test_chunk_size", "train_chunk_size", mode="before")
    @classmethod
    def _chunk_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # lax mode would read True as 1 (the schema bounds the rest)
            raise ValueError(f"chunk size must be 'auto' or an integer ≥ 1, got {value!r}")
        return value


class OutputSpec(_Section):
    """Where the results go, how to reach storage, and which derived results to write. Not
    fingerprinted: a changed top-k rewrites the summary, the arrays stay."""

    output: str = Field(
        "influence-output/run",
        title="Output URL",
        description="fsspec URL (local directory, file://, memory://, s3://bucket/prefix); not "
        "the root of a filesystem.",
        # in the JSON schema, so a deployment refuses a run with an empty or root output
        pattern=r"^(?![A-Za-z][A-Za-z0-9+.-]*:///*$)(?!/+$)\s*\S",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        title="Storage options",
        description="fsspec options for every URL (e.g. endpoint_url for S3). Credential-like "
        "values are masked in logs and the manifest, but a run's parameters are stored by "
        "Prefect: pass credentials through a storage secret block or the environment.",
    )
    storage_secret: Optional[str] = Field(
        None,
        title="Storage secret block",
        description="Name of a Prefect Secret block whose value (a JSON object, e.g. "
        '{"key": ..., "secret": ...}) is merged into the storage options at run time, inside '
        "each task; the credentials never enter the run's parameters, logs or the manifest.",
    )
    summary: bool = Field(
        True,
        title="Top-k summary",
        description="Also write the most helpful and most harmful training points of every test point (Up mode).",
    )
    top_k: int = Field(
        10,
        ge=1,
        title="Top k",
        description="Most helpful/harmful training points kept per test point.",
    )
    self_influence: bool = Field(
        True,
        title="Self-influence",
        description="Also compute every training point's self-influence.",
    )

    train_features: TrainFeatures = Field(
        TrainFeatures.none,
        title="Stored train features",
        description="Also store, per train chunk, what a query needs from the training side: "
        "its per-sample gradients (exact, n_train × p) or a seeded random projection of them "
        "(projected, n_train × projection_dim); queries then skip the gradient pass.",
    )
    projection_dim: int = Field(
        DEFAULT_PROJECTION_DIM,
        ge=1,
        title="Projection dimension",
        description="Dimension of projected train features.",
    )

    @field_validator("output", mode="before")  # before the schema's pattern: clearer messages
    @classmethod
    def _output_location(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if not value.strip():
            raise ValueError("output must be a non-empty URL or path")
        from .locations import output_location

        return output_location(value)


class RunOptions(_Section):
    """How one run behaves: never recorded in the fingerprint, never changing a number."""

    overwrite: bool = Field(
        False,
        title="Overwrite",
        description="Replace an existing output made with another configuration.",
    )
    force: bool = Field(
        False,
        title="Force takeover",
        description="Take the output over from another run that still holds its lease (only when that run is known to be dead).",
    )
    dask_address: Optional[str] = Field(
        None,
        title="Dask scheduler",
        description="Address of an existing Dask scheduler; empty for a local cluster.",
    )
    n_workers: Optional[int] = Field(
        None,
        ge=1,
        title="Workers",
        description="Workers of the local cluster (default: CPU count), "
        "one thread each; with a Dask scheduler, the worker count auto chunks are planned for "
        "(default: its workers when the run starts).",
    )


class PipelineConfig(RunOptions, OutputSpec, JobSpec):
    """Everything an influence job needs, as one flat set of fields (a job file, a flow's
    parameter form): the fields of :class:`JobSpec`, :class:`OutputSpec` and :class:`RunOptions`."""

    def job(self) -> JobSpec:
        """The fields that determine the numbers."""
        return JobSpec.model_validate(self.model_dump(include=set(JobSpec.model_fields)))

    def redacted(self) -> dict[str, Any]:
        """The configuration as JSON data with credential-like storage options masked."""
        data = json.loads(self.model_dump_json())
        data["storage_options"] = redact(data.get("storage_options", {}))
        return data


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Mask values whose key looks like a credential (key, secret, token, password...)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(s in k.lower() for s in _SECRET_KEYS):
            out[k] = "***"
        else:
            out[k] = v
    return out


class QuerySpec(_Section):
    """A query: a few new test points scored against the training set of a stored job, with
    its fitted influence model (the run form of the ``influence-query`` deployment)."""

    output: str = Field(
        "influence-output/run",
        title="Output URL",
        description="Output of a job (fitted at least) whose model and training set to use.",
    )
    test: str = Field(
        BUILTIN,
        title="Query points",
        description="Data location of the points to score, as a job's test data (zarr group, "
        "x.npy/y.npy directory, .npz, 'module:function', builtin:digits).",
    )
    top_k: int = Field(
        10, ge=1, title="Top k", description="Most helpful/harmful training points per point."
    )
    rows_output: Optional[str] = Field(
        None,
        title="Full rows URL",
        description="Also write every influence (n_query × n_train) as a .npy file here.",
    )
    use_features: bool = Field(
        True,
        title="Use stored features",
        description="Use the output's stored train features when it has them (else compute "
        "per-sample gradients of the training set).",
    )
    refine: bool = Field(
        True,
        title="Exact scores",
        description="With projected features, score the best candidates exactly (their "
        "gradients); off: return the projection's estimates.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        title="Storage options",
        description="fsspec options for every URL; empty: those the job was run with (without "
        "masked credentials).",
    )
    storage_secret: Optional[str] = Field(
        None,
        title="Storage secret block",
        description="Name of a Prefect Secret block merged into the storage options (default: "
        "the job's).",
    )
