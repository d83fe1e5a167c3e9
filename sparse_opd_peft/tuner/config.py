"""``SparseOPDConfig``: the PEFT config of the sparse on-policy-distillation adapter."""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft.config import PeftConfig

from ..choices import SAVE_DTYPES
from .peft_type import FORMAT_VERSION as CONFIG_FORMAT_VERSION
from .peft_type import PEFT_TYPE

GRAD_PATHS = ("auto", "dense_rows", "sampled", "gather")
# Fields that hold tensors or objects at construction time; they never reach adapter_config.json.
RUNTIME_ONLY_FIELDS = ("mask", "subspace", "exclude")


class AllCoordinates:
    """``mask=ALL_COORDINATES``: every coordinate of the ``target_modules`` Linear layers (density 1). A config with
    ``target_modules`` and neither mask, subspace nor adapter metadata gets it at construction."""

    def __repr__(self) -> str:
        return "ALL_COORDINATES"

    def __eq__(self, other) -> bool:
        return isinstance(other, AllCoordinates)

    def __hash__(self) -> int:
        return hash(AllCoordinates)

    def __reduce__(self):
        return (AllCoordinates, ())


ALL_COORDINATES = AllCoordinates()


@dataclass
class SparseOPDConfig(PeftConfig):
    """Configuration of a sparse OPD adapter: train exactly the coordinates of a mask (and/or a fixed subspace).

    Per targeted Linear of weight shape (out, in), the adapter trains ``values`` (1-D, one float32 per masked
    coordinate, zero-initialised) and, with a subspace, ``coeff`` (out, r) against a fixed basis (in, r), so that
    ``ΔW = scatter(values) + coeff @ basis.T``. The wrapped model starts identical to the base.

    Args:
        mask: a :class:`~sparse_opd_peft.SparseMask`, a dict ``{module_name: bool tensor (out, in)}``, or a path to
            a saved mask. The targeted modules are the mask's modules (and the subspace's), narrowed by
            ``target_modules`` when given. ``target_modules`` alone (no mask, subspace or metadata) means
            ``mask=ALL_COORDINATES``: every coordinate of the matched Linear layers is trained (density 1).

    A config is a value as far as the adapter goes: ``get_peft_model`` / ``add_adapter`` read ``mask`` /
    ``subspace`` / ``exclude`` / ``target_modules`` and never change them, so one config can be used any number of
    times (and deep-copied) and yields the same adapter each time. As with every peft config, the object passed is the
    adapter's ``model.peft_config[name]``: its metadata fields (``module_nnz``, ``module_shapes``, ``fingerprint``,
    densities, ``mask_metadata``) describe the adapter built last and are re-derived from the model on each save.
    ``adapter_config.json`` holds that metadata and no inputs; built from it (no mask / subspace), an adapter's
    coordinates come from its file (``PeftModel.from_pretrained`` / ``load_adapter``), after the fingerprint check.
        subspace: ``{module_name: float tensor (in, r)}`` with (ideally orthonormal) columns, or a path to a
            safetensors file of them. Every update of that module then lies in the row space of the basis.
        exclude: coordinates that must not be trained (continual post-training churn budget): a mask in any of the
            forms ``mask`` accepts; removed from ``mask`` before injection.
        target_modules: optional narrowing of the mask's modules (list of names / suffixes, or a regex string).
        init_weights: zero-initialise ``values`` and ``coeff`` (identity adapter). ``False`` draws small random
            values, for tests.
        save_dtype: dtype of ``values``/``coeff`` in ``adapter_model.safetensors``: ``"float32"`` (default, for
            resuming training) or ``"bfloat16"`` / ``"float16"`` (for sharing).
        check_fingerprint: on load, verify that the base weights match the recorded fingerprint.
        fingerprint_full: also hash every entry of each targeted weight (slower) instead of a strided sample.
        grad_path: how ``d values`` is computed: ``"dense_rows"`` (row blocks of ``dyᵀx`` then a gather),
            ``"sampled"`` (``torch.sparse.sampled_addmm``: only the nnz products, no dense block), ``"gather"``
            (per-coordinate products) or ``"auto"`` (sampled up to 15 % density on CPU, dense_rows above).
        grad_block_bytes: memory bound of one dense row block in the backward pass.
        training: optional JSON-only training recipe (loss, teacher, steps, optimizer, ..., and optionally a
            ``diagnostics`` summary) shown in the model card; set it with :func:`sparse_opd_peft.record_training`.
            Adapter files written before this field existed load with ``training=None``.
    """

    mask: Optional[Any] = field(default=None, metadata={"help": "SparseMask, {name: bool tensor} or path."})
    subspace: Optional[Any] = field(default=None, metadata={"help": "{name: (in, r) basis} or path."})
    exclude: Optional[Any] = field(default=None, metadata={"help": "Coordinates never to train (churn budget)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Optional narrowing of the mask's modules."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Unsupported; keep None."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra fully trained modules."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise the adapter (identity)."})
    save_dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16 on disk."})
    check_fingerprint: bool = field(default=True, metadata={"help": "Verify the base weights on load."})
    fingerprint_full: bool = field(default=False, metadata={"help": "Hash whole weights, not a sample."})
    grad_path: str = field(default="auto", metadata={"help": "auto | dense_rows | sampled | gather."})
    grad_block_bytes: int = field(default=64 * 2**20, metadata={"help": "Bound of a backward row block."})
    # ---- JSON-able metadata, filled by get_peft_model and read back by PeftModel.from_pretrained
    module_nnz: dict[str, int] = field(default_factory=dict)
    module_rank: dict[str, int] = field(default_factory=dict)
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    fingerprint: dict[str, dict] = field(default_factory=dict)
    mask_metadata: dict = field(default_factory=dict)
    density: Optional[float] = None
    density_by_type: dict[str, float] = field(default_factory=dict)
    training: Optional[dict] = field(default=None, metadata={"help": "JSON-only training recipe (model card)."})
    format_version: int = CONFIG_FORMAT_VERSION

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"SparseOPDConfig.save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.grad_path not in GRAD_PATHS:
            raise ValueError(f"SparseOPDConfig.grad_path must be one of {GRAD_PATHS}, got {self.grad_path!r}")
        if self.target_parameters:
            raise ValueError("SparseOPDConfig does not support target_parameters; mask Linear modules instead")
        if int(self.format_version) > CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"adapter_config.json has sparse_opd format_version {self.format_version}, newer than this "
                f"sparse_opd_peft supports ({CONFIG_FORMAT_VERSION}); upgrade sparse_opd_peft"
            )
        if self.training is not None:
            self.training = check_json_dict(self.training, "SparseOPDConfig.training")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.mask is None and self.subspace is None and self.target_modules and not self.has_metadata():
            self.mask = ALL_COORDINATES
        if not (self.mask is not None or self.subspace is not None or self.has_metadata()):
            warnings.warn(
                "SparseOPDConfig has neither a mask, a subspace nor target_modules; get_peft_model will fail until one "
                "is given",
                stacklevel=2,
            )

    def has_metadata(self) -> bool:
        """True for the config of an existing adapter (from ``adapter_config.json`` or ``model.peft_config``): it
        lists per-module coordinate counts / ranks instead of holding a mask or a subspace."""
        return bool(self.module_nnz or self.module_rank)

    def to_dict(self) -> dict:
        """JSON-able dict of the config (what ``adapter_config.json`` holds): the inputs (mask, subspace, exclude)
        become None, whatever form they had (a mask path is kept in ``mask_metadata["path"]``): a config read back
        describes the saved adapter through its metadata, whose coordinates come from the adapter file."""
        out = {}
        for f in fields(self):
            value = None if f.name in RUNTIME_ONLY_FIELDS else copy.deepcopy(getattr(self, f.name))
            out[f.name] = value
        return out

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse an ``adapter_config.json`` of another peft method before any field is interpreted."""
        peft_type = kwargs.get("peft_type")
        peft_type = getattr(peft_type, "value", peft_type)
        if peft_type is not None and str(peft_type) != PEFT_TYPE.value:
            raise ValueError(
                f"adapter_config.json is a {peft_type} adapter, not a {PEFT_TYPE.value} one; load it with peft's own "
                "PeftModel.from_pretrained / AutoPeftModelForCausalLM (sparse_opd_peft is not needed for it), or pass "
                "the directory / repo of a SparseOPD adapter"
            )
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load ``adapter_config.json`` (local directory or Hub repo id, Hub cache included) and check the adapter
        file next to it *before* peft touches the base model: a missing, truncated or corrupt
        ``adapter_model.safetensors``, bad coordinates, another peft method or a newer ``format_version`` raise
        ``ValueError`` / ``FileNotFoundError`` naming the source and the fix, and the base model stays unwrapped."""
        from .files import (
            check_adapter_config_fields,
            describe_hub_miss,
            locate_adapter_weights,
            read_adapter_config_json,
            validate_adapter_file,
        )

        source = os.fspath(pretrained_model_name_or_path)
        local = os.path.join(source, subfolder or "", "adapter_config.json")
        if os.path.isfile(local):  # the raw JSON fields first: a clear error instead of a traceback
            raw = read_adapter_config_json(local)
            if str(raw.get("peft_type")) == PEFT_TYPE.value:  # another method's config: check_kwargs says so below
                check_adapter_config_fields(raw, local)
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except ValueError as err:
            folder = os.path.join(source, subfolder or "")
            if err.__cause__ is not None and os.path.isdir(folder):
                raise ValueError(
                    f"{folder}: no adapter_config.json in this directory; pass the directory written by save_adapter "
                    "/ model.save_pretrained"
                ) from None
            if err.__cause__ is not None:
                raise ValueError(
                    describe_hub_miss(source, "adapter_config.json", subfolder, kwargs, err.__cause__)
                ) from None
            raise ValueError(f"{source}: {err}") from None
        _refuse_pickle(os.path.join(source, subfolder or ""))
        path = locate_adapter_weights(pretrained_model_name_or_path, subfolder, kwargs)
        if path is not None:
            validate_adapter_file(config, path)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """peft's ``PeftConfig.save_pretrained`` (writes ``adapter_config.json``), refusing to complete a pickle save:
        ``model.save_pretrained(dir, safe_serialization=False)`` raises ``ValueError`` here, after peft wrote
        ``adapter_model.bin`` and before the config, so no loadable pickle adapter is ever produced."""
        _refuse_pickle(save_directory)
        super().save_pretrained(save_directory, **kwargs)


PICKLE_REFUSAL = (
    "SparseOPD adapters are stored as safetensors only, never pickle: save with model.save_pretrained(dir) (the "
    "default safe_serialization=True) or sparse_opd_peft.save_adapter(model, dir)"
)


def _refuse_pickle(folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` when ``folder`` holds a pickle ``adapter_model.bin`` and no ``adapter_model.safetensors``."""
    if os.path.isfile(os.path.join(folder, "adapter_model.bin")) and not os.path.isfile(
        os.path.join(folder, "adapter_model.safetensors")
    ):
        raise ValueError(
            f"{folder}: the adapter weights are a pickle file (adapter_model.bin, written with "
            f"safe_serialization=False); {PICKLE_REFUSAL}. Delete adapter_model.bin and save again"
        )


def check_json_dict(value, what: str) -> dict:
    """Return ``value`` as it will read back from ``adapter_config.json`` (a JSON round trip: tuples become lists,
    non-string keys strings), after checking that it is a dict of JSON data.

    Raises:
        ValueError: ``value`` is not a dict, or holds tensors, NaN/inf or other non-JSON data.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON-able dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{what} must hold JSON data only (str, finite numbers, bools, None, lists, dicts): {err}"
        ) from None
