"""The SSBC submission: <base>/<set>/{Predictions,Binarised}/<stem>.png (base = <out>/<team>/<track>), greyscale
at task.submission.size: the probability resized bilinearly and stored as round(p * 255) ("Predictions"), then
thresholded at metric.threshold ("Binarised"); sclera.metric.benchmark_maps makes both, every file written
atomically."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image

from sclera.metric import benchmark_maps
from sclera.synth import save_atomic


def write_submission(results: Iterable[tuple[dict, dict]], base: Path, size: tuple[int, int],
                     threshold: float) -> Counter:
    """(outputs, batch) pairs -> the PNGs under `base`; returns the number of images written per set."""
    written: Counter = Counter()
    for outputs, batch in results:
        probs = torch.sigmoid(outputs["logits"].float())[:, 0]
        for i in range(probs.shape[0]):
            pred, binary = benchmark_maps(probs[i], size, threshold)
            folder = Path(base) / batch["set"][i]
            save_atomic(Image.fromarray(pred), folder / "Predictions" / f"{batch['stem'][i]}.png")   # 2-D uint8: L
            save_atomic(Image.fromarray(binary), folder / "Binarised" / f"{batch['stem'][i]}.png")
            written[batch["set"][i]] += 1
    if not written:
        raise ValueError("no images to predict: the evaluation sets are empty")
    return written
