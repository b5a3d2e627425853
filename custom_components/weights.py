"""Networks returned with their weights loaded, so a config's network ids are usable without an ``initialize`` step."""

from __future__ import annotations

import os

import torch

__all__ = ["load_weights"]


def load_weights(network: torch.nn.Module | None, path: str | os.PathLike, device: str | torch.device = "cpu",
                 strict: bool = True) -> torch.nn.Module | None:
    """``network`` on ``device`` in eval mode with the ``state_dict`` of ``path`` (loaded with ``weights_only``).

    ``None`` (a disabled network) is returned as is. A missing file, or weights that do not fit the network, raise
    an error naming the file. Used by inference.json as ``"$custom_components.weights.load_weights(@network_def,
    @model_path, @device)"``: every tool that parses the config (``monai.bundle run``, MONAI Label, a notebook) then
    gets a ready network, whether or not it runs the config's ``initialize``.
    """
    if network is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {str(path)!r} for {type(network).__name__} do not exist.")
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"weights {str(path)!r} do not fit {type(network).__name__}: {e}") from None
    return network.to(device).eval()
