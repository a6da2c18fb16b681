"""Import and export of the reference's PyTorch checkpoints.

The reference saves ``{"state_dict": ..., "cfg": ...}`` with ``torch.save``
(names and shapes in REFERENCE §6). ``load_reference_checkpoint`` turns such a
file into our parameter pytree and ``ModelConfig`` without torch and without
running pickled code (``torch_format``); ``save_reference_checkpoint`` writes
our parameters back in the same layout, readable by ``torch.load``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from orthorecall import torch_format
from orthorecall.cell import CellConfig
from orthorecall.model import ModelConfig, Params
from orthorecall.reads import ReadConfig, read_from_name

# cfg["variant"] values the reference uses, and how we read them.
_VARIANT_READS = {"baseline": "raw", "ns5": "ns5"}


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
    ``reads.read_from_name`` understands)."""
    try:
        return read_from_name(_VARIANT_READS.get(variant, variant))
    except ValueError:
        raise ValueError(
            f"checkpoint variant {variant!r} is not a read orthorecall knows; expected "
            "'baseline' or 'ns5' (or 'nsK', 'polar')."
        ) from None


def params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[Params, dict]:
    """Maps a reference state dict onto our layout.

    Returns:
        (params, dims) where dims holds vocab_size, embedding_dim, num_heads,
        inner_dim, conv_kernel_size and qkv_block_size read off the shapes.

    Raises:
        ValueError: a missing or unexpected name, or inconsistent shapes.
    """
    expected = set(_REFERENCE_NAMES)
    present = set(state_dict)
    if present != expected:
        raise ValueError(
            "not a reference one-block mLSTM state dict: missing "
            f"{sorted(expected - present)}, unexpected {sorted(present - expected)}."
        )
    sd = {name: np.asarray(value, np.float32) for name, value in state_dict.items()}
    vocab, dim = sd["embedding.weight"].shape
    heads = sd["layer.mlstm_cell.igate.bias"].shape[0]
    inner = sd["layer.learnable_skip"].shape[0]
    kernel = sd["layer.conv1d.conv.weight"].shape[-1]
    block = sd["layer.q_proj.weight"].shape[-1]
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
    dims = dict(
        vocab_size=vocab,
        embedding_dim=dim,
        num_heads=heads,
        inner_dim=inner,
        conv_kernel_size=kernel,
        qkv_block_size=block,
    )
    return params, dims


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
    # proj_factor 2 with rounding to 64 gives the reference inner width; when a
    # checkpoint's width disagrees, the inner width is taken as it is.
    cell = CellConfig(
        embedding_dim=dims["embedding_dim"],
        num_heads=dims["num_heads"],
        conv_kernel_size=dims["conv_kernel_size"],
        qkv_block_size=dims["qkv_block_size"],
        read=read,
        **cell_overrides,
    )
    if cell.inner_dim != dims["inner_dim"]:
        cell = cell.replace(proj_factor=dims["inner_dim"] / dims["embedding_dim"], inner_multiple=1)
    return ModelConfig(vocab_size=dims["vocab_size"], cell=cell)


def load_reference_checkpoint(path: str | os.PathLike, **cell_overrides) -> ReferenceCheckpoint:
    """Loads a reference ``.pt`` checkpoint into our parameters.

    Args:
        path: a ``torch.save`` file of ``{"state_dict": ..., "cfg": ...}``.
        **cell_overrides: ``CellConfig`` fields to set (e.g. ``chunk_size``,
            ``sequence_form``); the read comes from ``cfg["variant"]``.

    Returns:
        A ``ReferenceCheckpoint``.

    Raises:
        FileNotFoundError: no such file.
        torch_format.TorchCheckpointError: not a readable torch checkpoint.
        ValueError: a torch checkpoint, but not a reference model's.
    """
    obj = torch_format.load_torch_checkpoint(path)
    if not isinstance(obj, dict) or "state_dict" not in obj or "cfg" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{os.fspath(path)} is a torch checkpoint but not a reference one: expected a "
            f"dict with 'state_dict' and 'cfg', found {keys}."
        )
    cfg = dict(obj["cfg"])
    if "variant" not in cfg:
        raise ValueError(f"{os.fspath(path)}: cfg has no 'variant' (baseline or ns5).")
    params, dims = params_from_state_dict(obj["state_dict"])
    config = _model_config(dims, read_for_variant(cfg["variant"]), **cell_overrides)
    return ReferenceCheckpoint(params=params, config=config, cfg=cfg)


def save_reference_checkpoint(
    path: str | os.PathLike, params: Params, cfg: Mapping[str, Any]
) -> None:
    """Writes one-block parameters as a reference checkpoint (atomically).

    Args:
        path: destination ``.pt`` file.
        params: our parameters (one block).
        cfg: the run configuration to store (must include ``variant``).

    Raises:
        ValueError: more than one block, or no ``variant`` in cfg.
    """
    if "variant" not in cfg:
        raise ValueError("cfg must include 'variant' ('baseline' or 'ns5').")
    torch_format.save_torch_checkpoint(
        path, {"state_dict": state_dict_from_params(params), "cfg": dict(cfg)}
    )
