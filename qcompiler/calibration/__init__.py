"""Calibration: activation statistics of every linear (``statistics``) and layer-by-layer calibration
that runs a weight algorithm block by block (``layerwise``), then optionally tunes the quantized scales end to
end against the float model (``end_to_end``)."""
