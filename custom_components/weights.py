"""Networks returned with their weights loaded, so a config's network ids are usable without an ``initialize`` step."""

from __future__ import annotations

import os

import torch

__all__ = ["load_weights"]


def load_weights(network: torch.nn.Module | None, path: str | os.PathLike, device: str | torch.device = "cpu",
                 role: str | None = None) -> torch.nn.Module | None:
    """``network`` on ``device`` in eval mode with the ``state_dict`` of ``path`` (loaded with ``weights_only``).

    ``None`` (a disabled network) is returned as is. The checks and messages are those of
    :func:`custom_components.inference.load_weights` (missing, empty or truncated file, 2D/3D mix-up, other sizes).
    Declared by inference.json and evaluate.json (``{"_target_": "custom_components.weights.load_weights",
    "network": "@network_def", "path": "@model_path", "device": "@device"}``): every tool that parses the config
    (``monai.bundle run``, MONAI Label, a notebook) then gets a ready network, whether or not it runs the config's
    ``initialize``.
    """
    from .inference import load_weights as _load

    if network is None:
        return None
    role = role or {"LocalDiscriminator": "local discriminator", "ErrorPredictor": "error-prediction head"}.get(
        type(network).__name__, "generator")
    return _load(network, path, device, role).to(device).eval()
