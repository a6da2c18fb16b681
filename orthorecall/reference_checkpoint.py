"""Import and export of the reference's PyTorch checkpoints.

The reference saves ``{"state_dict": ..., "cfg": ...}`` with ``torch.save``
(names and shapes in REFERENCE §6). ``load_reference_checkpoint`` turns such a
file into our parameter pytree and ``ModelConfig`` without torch and without
running pickled code (``torch_format``); ``save_reference_checkpoint`` writes
our parameters back in the same layout, readable by ``torch.load``.

The checkpoint's own cfg says what every tensor's shape must be: ``vocab_size``
and ``dim`` as the reference records them (else the embedding's shape), and the
widths the reference fixes (4 heads, inner width ``2 * dim`` rounded up to a
multiple of 64, conv kernel 4, q/k/v blocks of 4) unless the cfg records
``num_heads``, ``inner_dim``, ``conv_kernel_size`` or ``qkv_block_size``, as our
exports of other widths do. Each tensor is checked against that, by name, before
its data is read.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from orthorecall import torch_format
from orthorecall.cell import CellConfig
from orthorecall.model import ModelConfig, Params
from orthorecall.reads import ReadConfig, read_from_name
from orthorecall.validation import check_int

# cfg["variant"] values the reference uses, and how we read them.
_VARIANT_READS = {"baseline": "raw", "ns5": "ns5"}
# Floating dtypes a checkpoint's tensors may have; the reference saves float32 and the
# others convert to it exactly (float64 up to rounding).
_FLOAT_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16))
# Widths the reference model fixes; a cfg may record others under these names.
_REFERENCE_WIDTHS = {"num_heads": 4, "conv_kernel_size": 4, "qkv_block_size": 4}
# CellConfig fields that the checkpoint determines, so no override may set them.
_FIXED_CELL_FIELDS = (
    "embedding_dim",
    "num_heads",
    "proj_factor",
    "inner_multiple",
    "conv_kernel_size",
    "qkv_block_size",
    "read",
    "num_blocks",
)


@dataclasses.dataclass(frozen=True)
class ReferenceCheckpoint:
    """A reference checkpoint in our terms.

    Attributes:
        params: our parameter pytree (numpy float32 arrays).
        config: the ``ModelConfig`` that reproduces the reference model.
        cfg: the reference's own run configuration (plain dict).
    """

    params: Params
    config: ModelConfig
    cfg: dict


def read_for_variant(variant: str) -> ReadConfig:
    """The read of a reference variant name ("baseline", "ns5", or any name
    ``reads.read_from_name`` understands).

    Raises:
        ValueError: not a string, or not a read orthorecall knows.
    """
    if not isinstance(variant, str):
        raise ValueError(
            f"cfg['variant'] must be a string such as 'baseline' or 'ns5', got {variant!r} "
            f"({type(variant).__name__})."
        )
    try:
        return read_from_name(_VARIANT_READS.get(variant, variant))
    except ValueError:
        raise ValueError(
            f"checkpoint variant {variant!r} is not a read orthorecall knows; expected "
            "'baseline' or 'ns5' (or 'nsK', 'polar')."
        ) from None


def reference_dims(cfg: Mapping[str, Any], state_dict: Mapping[str, Any] | None = None) -> dict:
    """The widths a checkpoint's cfg describes (see the module docstring).

    Args:
        cfg: the checkpoint's cfg.
        state_dict: its state dict; ``embedding.weight``'s shape supplies
            ``vocab_size`` and ``dim`` where the cfg lacks them.

    Returns:
        dict of vocab_size, embedding_dim, num_heads, inner_dim, conv_kernel_size and
        qkv_block_size (ints), and ``source``, a phrase saying where they came from.

    Raises:
        ValueError: naming the cfg field that is of the wrong type or value.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"cfg must be a dict, got a {type(cfg).__name__}.")
    embedding = state_dict.get("embedding.weight") if isinstance(state_dict, Mapping) else None
    shape = tuple(getattr(embedding, "shape", ()))
    found: dict[str, int] = {}
    origin: dict[str, str] = {}

    def take(key: str, minimum: int, fallback: int | None, where: str) -> None:
        if cfg.get(key) is not None:
            found[key], origin[key] = check_int(f"cfg[{key!r}]", cfg[key], minimum=minimum), "cfg"
        elif fallback is not None:
            found[key], origin[key] = fallback, where

    take("vocab_size", 2, shape[0] if len(shape) == 2 else None, "embedding.weight")
    take("dim", 1, shape[1] if len(shape) == 2 else None, "embedding.weight")
    if len(found) < 2:
        raise ValueError(
            "cannot tell the model's widths: cfg records no 'vocab_size' and 'dim' and there "
            "is no 2-D 'embedding.weight' to read them from."
        )
    for key, value in _REFERENCE_WIDTHS.items():
        take(key, 1, value, "the reference model")
    take("inner_dim", 1, CellConfig(embedding_dim=found["dim"]).inner_dim, "the reference model")
    for of in ("num_heads", "qkv_block_size"):
        if found["inner_dim"] % found[of]:
            raise ValueError(
                f"inner_dim={found['inner_dim']} is not divisible by {of}={found[of]}; "
                f"check cfg['inner_dim'] and cfg[{of!r}]."
            )
    source = "; ".join(
        ", ".join(f"{k}={found[k]}" for k in found if origin[k] == where) + f" from {where}"
        for where in dict.fromkeys(origin.values())
    )
    dims = {("embedding_dim" if k == "dim" else k): v for k, v in found.items()}
    return {**dims, "source": source}


def expected_shapes(dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Each reference state-dict name's shape for the widths ``dims`` (as
    ``reference_dims`` returns them), in the reference's order."""
    v, d, h = dims["vocab_size"], dims["embedding_dim"], dims["num_heads"]
    i, k, b = dims["inner_dim"], dims["conv_kernel_size"], dims["qkv_block_size"]
    shapes = {
        "embedding.weight": (v, d),
        "norm.weight": (d,),
        "layer.learnable_skip": (i,),
        "layer.proj_up.weight": (2 * i, d),
        "layer.q_proj.weight": (i // b, b, b),
        "layer.k_proj.weight": (i // b, b, b),
        "layer.v_proj.weight": (i // b, b, b),
        "layer.conv1d.conv.weight": (i, 1, k),
        "layer.conv1d.conv.bias": (i,),
        "layer.mlstm_cell.igate.weight": (h, 3 * i),
        "layer.mlstm_cell.igate.bias": (h,),
        "layer.mlstm_cell.fgate.weight": (h, 3 * i),
        "layer.mlstm_cell.fgate.bias": (h,),
        "layer.mlstm_cell.outnorm.weight": (i,),
        "layer.proj_down.weight": (d, i),
        "post_norm.weight": (d,),
        "head.weight": (v, d),
        "head.bias": (v,),
    }
    return {name: shapes[name] for name in _REFERENCE_NAMES}


def check_state_dict(state_dict: Any, dims: Mapping[str, Any]) -> None:
    """Checks names, kinds, dtypes and shapes of a reference state dict against
    ``dims`` (from ``reference_dims``); values may be arrays or
    ``torch_format.TensorSpec``s, so this can run before any tensor data is read.

    Raises:
        ValueError: listing every problem, each naming its tensor.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"the checkpoint's state_dict must be a dict of tensors, got a "
            f"{type(state_dict).__name__}."
        )
    expected = expected_shapes(dims)
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    if missing or unexpected:
        raise ValueError(
            "not a reference one-block mLSTM state dict: missing "
            f"{missing}, unexpected {sorted(unexpected, key=repr)}."
        )
    problems = []
    for name, shape in expected.items():
        value = state_dict[name]
        if not isinstance(value, (np.ndarray, torch_format.TensorSpec)):
            problems.append(f"{name!r} is a {type(value).__name__}, expected a tensor")
        elif np.dtype(value.dtype) not in _FLOAT_DTYPES:
            problems.append(f"{name!r} has dtype {np.dtype(value.dtype)}, expected float32")
        elif tuple(value.shape) != shape:
            problems.append(f"{name!r} has shape {tuple(value.shape)}, expected {shape}")
    if problems:
        raise ValueError(
            f"the state dict does not match the model its cfg describes ({dims['source']}): "
            + "; ".join(problems)
            + ". Re-export the checkpoint, or correct its cfg."
        )


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], cfg: Mapping[str, Any] | None = None
) -> tuple[Params, dict]:
    """Maps a reference state dict onto our layout, after checking it.

    Args:
        state_dict: reference names to float arrays.
        cfg: the checkpoint's cfg, which fixes the widths (module docstring); without
            it, the embedding and the reference's widths do.

    Returns:
        (params, dims) where dims holds vocab_size, embedding_dim, num_heads,
        inner_dim, conv_kernel_size and qkv_block_size.

    Raises:
        ValueError: a missing or unexpected name, a tensor of the wrong kind, dtype or
            shape, or non-finite (NaN or infinite) weights, each named.
    """
    dims = reference_dims({} if cfg is None else cfg, state_dict)
    check_state_dict(state_dict, dims)
    sd = {name: np.asarray(state_dict[name], np.float32) for name in _REFERENCE_NAMES}
    bad = {name: int(np.size(a) - np.isfinite(a).sum()) for name, a in sd.items()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        raise ValueError(
            "non-finite weights (NaN or infinity) in "
            + ", ".join(f"{name!r} ({n} of {sd[name].size} entries)" for name, n in bad.items())
            + ": the run that saved this checkpoint diverged or the file is damaged; "
            "such a model cannot be evaluated."
        )
    cell = {
        "up_proj": sd["layer.proj_up.weight"].T,
        "conv": {
            "kernel": sd["layer.conv1d.conv.weight"][:, 0, :].T,
            "bias": sd["layer.conv1d.conv.bias"],
        },
        "q_proj": sd["layer.q_proj.weight"],
        "k_proj": sd["layer.k_proj.weight"],
        "v_proj": sd["layer.v_proj.weight"],
        "input_gate": {
            "kernel": sd["layer.mlstm_cell.igate.weight"].T,
            "bias": sd["layer.mlstm_cell.igate.bias"],
        },
        "forget_gate": {
            "kernel": sd["layer.mlstm_cell.fgate.weight"].T,
            "bias": sd["layer.mlstm_cell.fgate.bias"],
        },
        "out_norm": {"scale": sd["layer.mlstm_cell.outnorm.weight"]},
        "skip": sd["layer.learnable_skip"],
        "down_proj": sd["layer.proj_down.weight"].T,
    }
    params = {
        "embedding": sd["embedding.weight"],
        "blocks": [{"norm": {"scale": sd["norm.weight"]}, "mlstm": cell}],
        "post_norm": {"scale": sd["post_norm.weight"]},
        "head": {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]},
    }
    params = jax.tree_util.tree_map(np.ascontiguousarray, params)
    return params, {k: v for k, v in dims.items() if k != "source"}


def state_dict_from_params(params: Params) -> collections.OrderedDict[str, np.ndarray]:
    """Our one-block parameters in the reference's names and layouts.

    Raises:
        ValueError: more than one block (the reference layout has one).
    """
    if len(params["blocks"]) != 1:
        raise ValueError(
            f"the reference layout holds one block; these parameters have {len(params['blocks'])}."
        )
    p = jax.tree_util.tree_map(np.asarray, params)
    block = p["blocks"][0]
    c = block["mlstm"]
    sd = {
        "embedding.weight": p["embedding"],
        "norm.weight": block["norm"]["scale"],
        "post_norm.weight": p["post_norm"]["scale"],
        "layer.proj_up.weight": c["up_proj"].T,
        "layer.conv1d.conv.weight": c["conv"]["kernel"].T[:, None, :],
        "layer.conv1d.conv.bias": c["conv"]["bias"],
        "layer.q_proj.weight": c["q_proj"],
        "layer.k_proj.weight": c["k_proj"],
        "layer.v_proj.weight": c["v_proj"],
        "layer.mlstm_cell.igate.weight": c["input_gate"]["kernel"].T,
        "layer.mlstm_cell.igate.bias": c["input_gate"]["bias"],
        "layer.mlstm_cell.fgate.weight": c["forget_gate"]["kernel"].T,
        "layer.mlstm_cell.fgate.bias": c["forget_gate"]["bias"],
        "layer.mlstm_cell.outnorm.weight": c["out_norm"]["scale"],
        "layer.learnable_skip": c["skip"],
        "layer.proj_down.weight": c["down_proj"].T,
        "head.weight": p["head"]["kernel"].T,
        "head.bias": p["head"]["bias"],
    }
    # An OrderedDict in the reference's order, as torch's own state dicts are.
    return collections.OrderedDict(
        (name, np.ascontiguousarray(sd[name], np.float32)) for name in _REFERENCE_NAMES
    )


# The reference's parameter names, in the order its state dicts list them.
_REFERENCE_NAMES = (
    "embedding.weight",
    "norm.weight",
    "layer.learnable_skip",
    "layer.proj_up.weight",
    "layer.q_proj.weight",
    "layer.k_proj.weight",
    "layer.v_proj.weight",
    "layer.conv1d.conv.weight",
    "layer.conv1d.conv.bias",
    "layer.mlstm_cell.igate.weight",
    "layer.mlstm_cell.igate.bias",
    "layer.mlstm_cell.fgate.weight",
    "layer.mlstm_cell.fgate.bias",
    "layer.mlstm_cell.outnorm.weight",
    "layer.proj_down.weight",
    "post_norm.weight",
    "head.weight",
    "head.bias",
)


def _model_config(dims: dict, read: ReadConfig, **cell_overrides) -> ModelConfig:
    cell = CellConfig(
        embedding_dim=dims["embedding_dim"],
        num_heads=dims["num_heads"],
        conv_kernel_size=dims["conv_kernel_size"],
        qkv_block_size=dims["qkv_block_size"],
        read=read,
        **cell_overrides,
    )
    i, d = dims["inner_dim"], dims["embedding_dim"]
    if cell.inner_dim != i:
        # CellConfig derives I as ceil(proj_factor * D); I / D * D can land a hair above
        # I (60 / 29 * 29 > 60), and half a unit below is safe for any width.
        factor = next(f for f in (i / d, (i - 0.5) / d) if math.ceil(f * d) == i)
        cell = cell.replace(proj_factor=factor, inner_multiple=1)
    return ModelConfig(vocab_size=dims["vocab_size"], cell=cell)


def _contents(obj: Any) -> tuple[Any, Mapping[str, Any]]:
    """(state_dict, cfg) of a loaded checkpoint, with cfg checked to be a dict with a variant."""
    if not isinstance(obj, dict) or "state_dict" not in obj or "cfg" not in obj:
        keys = sorted(obj, key=repr) if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ValueError(
            "a torch checkpoint but not a reference one: expected a dict with 'state_dict' "
            f"and 'cfg', found {keys}."
        )
    cfg = obj["cfg"]
    if not isinstance(cfg, Mapping):
        raise ValueError(f"the checkpoint's cfg must be a dict, got a {type(cfg).__name__}.")
    if "variant" not in cfg:
        raise ValueError("cfg['variant'] is missing; expected 'baseline' or 'ns5'.")
    return obj["state_dict"], cfg


def load_reference_checkpoint(path: str | os.PathLike, **cell_overrides) -> ReferenceCheckpoint:
    """Loads a reference ``.pt`` checkpoint into our parameters.

    The cfg and every tensor's name, dtype and shape are checked (module docstring)
    before any tensor data is read; the weights must then be finite.

    Args:
        path: a ``torch.save`` file of ``{"state_dict": ..., "cfg": ...}``.
        **cell_overrides: ``CellConfig`` fields to set (e.g. ``chunk_size``,
            ``sequence_form``); the read comes from ``cfg["variant"]`` and the widths
            from the checkpoint.

    Returns:
        A ``ReferenceCheckpoint``.

    Raises:
        FileNotFoundError: no such file (other ``OSError``s as ``open``).
        torch_format.TorchCheckpointError: not a readable torch checkpoint.
        ValueError: a torch checkpoint, but not a reference model's, or a bad override;
            the message starts with the path and names the offending cfg field or tensor.
    """
    where = os.fspath(path)
    cell_fields = {f.name for f in dataclasses.fields(CellConfig)}
    unknown = sorted(set(cell_overrides) - cell_fields)
    fixed = sorted(set(cell_overrides) & set(_FIXED_CELL_FIELDS))
    if unknown or fixed:
        raise ValueError(
            f"{where}: cannot override {unknown or fixed}: "
            + ("not CellConfig fields" if unknown else "the checkpoint determines them")
            + "; chunk_size, sequence_form and compute_dtype can be set."
        )
    # The layout alone first, so that no tensor's data is read before its shape is known
    # to be the one the cfg describes.
    specs = torch_format.load_torch_checkpoint(path, metadata_only=True)
    try:
        state_dict, cfg = _contents(specs)
        read = read_for_variant(cfg["variant"])
        check_state_dict(state_dict, reference_dims(cfg, state_dict))
        obj = torch_format.load_torch_checkpoint(path)
        # Checked again: the file may have changed in between.
        state_dict, cfg = _contents(obj)
        params, dims = params_from_state_dict(state_dict, cfg)
        config = _model_config(dims, read, **cell_overrides)
    except torch_format.TorchCheckpointError:
        raise  # names the path already
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return ReferenceCheckpoint(params=params, config=config, cfg=dict(cfg))


def save_reference_checkpoint(
    path: str | os.PathLike, params: Params, cfg: Mapping[str, Any]
) -> None:
    """Writes one-block parameters as a reference checkpoint (atomically).

    Widths that differ from the reference model's (``num_heads``, ``inner_dim``,
    ``conv_kernel_size``, ``qkv_block_size``) are added to the stored cfg, so that the
    file describes its own shapes and ``load_reference_checkpoint`` reads it back.

    Args:
        path: destination ``.pt`` file.
        params: our parameters (one block).
        cfg: the run configuration to store (must include ``variant``); widths it
            records (``vocab_size``, ``dim``, ...) must be the parameters'.

    Raises:
        ValueError: more than one block, no valid ``variant`` in cfg, or a cfg width
            that contradicts the parameters (nothing is written).
    """
    if not isinstance(cfg, Mapping) or "variant" not in cfg:
        raise ValueError("cfg must be a dict that includes 'variant' ('baseline' or 'ns5').")
    read_for_variant(cfg["variant"])
    state_dict = state_dict_from_params(params)
    vocab, dim = state_dict["embedding.weight"].shape
    actual = {
        "vocab_size": vocab,
        "dim": dim,
        "num_heads": state_dict["layer.mlstm_cell.igate.bias"].shape[0],
        "inner_dim": state_dict["layer.learnable_skip"].shape[0],
        "conv_kernel_size": state_dict["layer.conv1d.conv.weight"].shape[-1],
        "qkv_block_size": state_dict["layer.q_proj.weight"].shape[-1],
    }
    reference = {**_REFERENCE_WIDTHS, "inner_dim": CellConfig(embedding_dim=dim).inner_dim}
    cfg = dict(cfg)
    for key, value in actual.items():
        if cfg.get(key) is not None:
            if check_int(f"cfg[{key!r}]", cfg[key]) != value:
                raise ValueError(
                    f"cfg[{key!r}]={cfg[key]!r} but the parameters have {key}={value}."
                )
        elif key in reference and value != reference[key]:
            cfg[key] = value
    check_state_dict(state_dict, reference_dims(cfg, state_dict))  # as a load would
    torch_format.save_torch_checkpoint(path, {"state_dict": state_dict, "cfg": cfg})


# The model settings a reference checkpoint fixes, and the configuration fields they are.
_SETTING_FIELDS = {
    "vocab_size": "task.vocab_size",
    "embedding_dim": "model.embedding_dim",
    "num_heads": "model.num_heads",
    "inner_dim": "model.proj_factor (the inner width)",
    "conv_kernel_size": "model.conv_kernel_size",
    "qkv_block_size": "model.qkv_block_size",
}


def _config_dims(config: ModelConfig) -> dict[str, int]:
    cell = config.cell
    return {
        "vocab_size": config.vocab_size,
        "embedding_dim": cell.embedding_dim,
        "num_heads": cell.num_heads,
        "inner_dim": cell.inner_dim,
        "conv_kernel_size": cell.conv_kernel_size,
        "qkv_block_size": cell.qkv_block_size,
    }


def check_initial_checkpoint(path: str | os.PathLike, config: ModelConfig) -> None:
    """Checks, without reading any tensor's data, that a reference checkpoint can start
    a model of ``config``: one block, and every width its cfg and tensors describe equal
    to the configuration's. The read is the configuration's, whatever the checkpoint's
    ``cfg["variant"]``: the reference starts its reads from the same weights.

    Raises:
        FileNotFoundError, OSError: the file cannot be opened.
        torch_format.TorchCheckpointError: not a readable torch checkpoint.
        ValueError: starting with the path, naming the configuration field or the
            tensor that differs.
    """
    where = os.fspath(path)
    if config.num_blocks != 1:
        raise ValueError(
            f"{where}: model.num_blocks: a reference checkpoint holds one block, the "
            f"configuration has {config.num_blocks}."
        )
    specs = torch_format.load_torch_checkpoint(path, metadata_only=True)
    try:
        state_dict, cfg = _contents(specs)
        dims = reference_dims(cfg, state_dict)
        check_state_dict(state_dict, dims)
    except torch_format.TorchCheckpointError:
        raise
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    wanted = _config_dims(config)
    differing = [
        f"{_SETTING_FIELDS[key]}: the checkpoint has {key}={dims[key]}, the configuration "
        f"{wanted[key]}"
        for key in _SETTING_FIELDS
        if dims[key] != wanted[key]
    ]
    if differing:
        raise ValueError(f"{where}: " + "; ".join(differing) + ".")


def initial_params(path: str | os.PathLike, config: ModelConfig) -> Params:
    """A reference checkpoint's weights as the parameters a model of ``config`` starts
    from (float32 numpy arrays in ``model.init_params``' layout).

    Raises:
        as :func:`check_initial_checkpoint`, and ValueError for non-finite weights.
    """
    check_initial_checkpoint(path, config)
    obj = torch_format.load_torch_checkpoint(path)
    try:
        state_dict, cfg = _contents(obj)
        params, dims = params_from_state_dict(state_dict, cfg)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from None
    if dims != _config_dims(config):  # The file changed since it was checked.
        raise ValueError(f"{os.fspath(path)}: its widths changed while it was being read.")
    return params
