"""Options as a command line gives them: ``--resume true`` reaches a config as the text ``"true"``."""

from __future__ import annotations

from monai.utils import str2bool

__all__ = ["as_flag"]

#: words a switch may be given as that ``monai.utils.str2bool`` does not know (it takes yes/true/t/y/1, no/false/f/n/0):
#: on/off, and an empty or null value (a switch left unset on the command line) as false
_FLAG_WORDS = {"on": "true", "off": "false", "none": "false", "null": "false", "": "false"}


def as_flag(value: bool | str | int | None, name: str = "flag") -> bool:
    """A boolean config option given as a bool or as the text a command line passes (``true``/``false``, ``1``/``0``).

    ``python -m monai.bundle run ... --resume true`` hands the config the string ``"true"``; a bare string would
    always be truthy, so configs read their switches through this function. The words are those of
    ``monai.utils.str2bool``, plus ``on``/``off`` and an empty or null value (false); anything else is a
    ``ValueError`` naming the option ``name``.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()  # str2bool neither strips nor takes numbers
    text = _FLAG_WORDS.get(text, text)
    try:
        return str2bool(text, raise_exc=True)
    except ValueError:  # str2bool's message does not say which option was wrong
        raise ValueError(f"{name} must be true or false, got {value!r}.") from None
