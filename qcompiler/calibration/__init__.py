"""Calibration: activation statistics of every linear (``statistics``) and layer-by-layer calibration
that runs a weight algorithm block by block (``layerwise``)."""
