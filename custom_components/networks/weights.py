"""The one loader of saved weights: the networks of a config returned with their weights, checked.

Declared by inference.json and evaluate.json (``{"_target_": "custom_components.networks.weights.load_weights",
"network": "@network_def", "path": "@model_path", "device": "@device"}``): every tool that parses the config
(``monai.bundle run``, MONAI Label, a notebook) gets a ready network, whether or not it runs the config's
``initialize``; the training config starts G from a plain UNet's weights through it
(:func:`custom_components.networks.nets.load_pretrained`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..utils.checks import check_device, verify_checksums

__all__ = ["load_weights"]

#: the role a network's weights are named by in an error, by its class (anything else is the generator)
_ROLES = {"LocalDiscriminator": "local discriminator", "ErrorPredictor": "error-prediction head"}


def load_weights(network: torch.nn.Module | None, path: str | os.PathLike, device: str | torch.device | None = None,
                 role: str | None = None, option: str = "model_dir", eval_mode: bool = True) -> torch.nn.Module | None:
    """``network`` with the ``state_dict`` of ``path`` (``torch.load(..., weights_only=True)``), moved to ``device``
    (if given) and, with ``eval_mode``, in eval mode; ``None`` (a disabled network) is returned as is.

    Errors name the file, the network's ``role`` (default: from its class) and the option to change (``--<option>``):
    a missing GPU (checked before the file is read: it is not a damaged file), a missing, empty, truncated or
    damaged file (its CRC-32 checksums), a 3D model in a 2D config (or the other way round), a model of another size.
    """
    if network is None:
        return None
    role = role or _ROLES.get(type(network).__name__, "generator")

    if device is not None:
        device = check_device(device)  # before the file is read: a missing GPU is not a damaged file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} weights {str(path)!r} do not exist (set --{option} to the training run's "
                                "model folder).")
    if path.stat().st_size == 0:
        raise ValueError(f"{role} weights {str(path)!r} are an empty file (0 bytes); expected a state dict saved "
                         "by the training run.")
    damaged = verify_checksums(path)
    if damaged is not None:
        raise ValueError(f"{role} weights {str(path)!r} ({path.stat().st_size} bytes) are damaged: {damaged}. "
                         "Use another copy of the file.")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not a complete checkpoint
        raise ValueError(f"{role} weights {str(path)!r} ({path.stat().st_size} bytes) cannot be loaded, the file is "
                         f"truncated or not a PyTorch state dict ({type(e).__name__}: {e}).") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{role} weights {str(path)!r} hold a {type(state).__name__}, expected a state dict.")
    own = network.state_dict()
    conv_dims = {v.ndim for k, v in state.items() if k.endswith("weight") and v.ndim >= 4} if state else set()
    own_dims = {v.ndim for k, v in own.items() if k.endswith("weight") and v.ndim >= 4}
    if conv_dims and own_dims and conv_dims.isdisjoint(own_dims):
        saved, built = max(conv_dims) - 2, max(own_dims) - 2
        raise ValueError(f"{role} weights {str(path)!r} hold a {saved}D model, but the config builds a {built}D "
                         f"network: use --spatial_dims {saved}.")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)}, network {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = ([f"{len(shapes)} tensor(s) of another shape (first: {shapes[0]})"] if shapes else []) + \
            ([f"{len(missing)} missing (first: {missing[0]})"] if missing else []) + \
            ([f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else [])
        raise ValueError(f"{role} weights {str(path)!r} do not fit the network built by the config: "
                         f"{'; '.join(parts)}. Use the options of the training run (--generator_channels, "
                         "--local_channels, --local_stem_stride, --spatial_dims, --network_def).")
    network.load_state_dict(state)
    if device is not None:
        network = network.to(device)
    return network.eval() if eval_mode else network
