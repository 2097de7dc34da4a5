"""The per-layer plan every format reader returns: plain data, no scheme or kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CT_FORMAT = "compressed-tensors"
MODELSLIM_FORMAT = "msmodelslim"


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's checkpoint tensors are, read from its format and checked to be servable.

    ``scheme`` names the layout within ``format`` (compressed-tensors: "W8A8", "W4A8", "W4A4",
    "WNA16", "FlatQuant"; msModelSlim: its label, such as "W8A8_DYNAMIC"); ``options`` are the
    scheme's settings as keyword arguments; ``source`` is what the plan was read from (a config
    group or a label), for messages. ``schemes.registry`` builds the scheme that ``matches`` it.
    """

    format: str
    scheme: str
    options: tuple[tuple[str, Any], ...] = ()
    source: str = ""

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.options)
