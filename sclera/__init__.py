"""Sclera segmentation (SSBC benchmark) with CGDSeg: data, model, loss, metric, task, synthetic eyes."""
