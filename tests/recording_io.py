"""A layer source for tests of the layer-by-layer engine: it records which layers a pass enters and the hidden
states each layer hands on (``llmprune.calibration.engine.LayerIO``)."""

from __future__ import annotations

from llmprune.calibration.engine import LayerIO


class RecordingIO(LayerIO):
    """Which layers a pass enters, and the hidden states each layer hands on."""

    def __init__(self):
        self.entered, self.left = [], {}

    def enter(self, i, layer):
        self.entered.append(i)

    def leave(self, i, layer, hidden):
        self.left[i] = [h.clone() for h in hidden]
        return hidden
