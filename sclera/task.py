"""The sclera task: CGDSeg binary sclera segmentation on the SSBC layout, scored as SSBC scores it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from common.build import build_encoder
from common.cache import maybe_cached
from common.image_cache import ImageCache
from common.metric import Metric
from common.task import Batch, Outputs, Task
from sclera.augment import build_train_transform
from sclera.data import ScleraDataset
from sclera.metric import batch_scores, benchmark_maps
from sclera.sets import SPLITS, evaluation_items, training_items
from sclera.synth import save_atomic, write_dataset

TRACKS = ("Synthetic", "Mixed")


def overlay(image: torch.Tensor, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """HxWx3 uint8: prediction tinted red, truth tinted green (both: yellow)."""
    rgb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    tint = np.zeros_like(rgb)
    tint[..., 0] = pred * 255
    if truth is not None:
        tint[..., 1] = truth * 255
    shown = (pred > 0) | (truth > 0 if truth is not None else False)
    rgb[shown] = 0.55 * rgb[shown] + 0.45 * tint[shown]
    return rgb.astype(np.uint8)


class ScleraTask(Task):
    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        if cfg.task.track not in TRACKS:
            raise ValueError(f"task.track={cfg.task.track!r}: expected one of {TRACKS} (the SSBC training track)")

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cfg.data.image_size[0]), int(self.cfg.data.image_size[1])

    def synthesize(self, root: Path, seed: int) -> None:
        s = self.cfg.data.synth
        write_dataset(Path(root), seed, int(s.train_per_set), int(s.val_per_set), int(s.eval_per_set))

    def datasets(self, root: Path, stage: str) -> dict[str, Dataset]:
        data, size = self.cfg.data, self.size
        # cached backbone tokens are of the clean, resized image: no pixel augmentation then
        augment = None if data.cache_features else build_train_transform(data.augment)
        view = f"resized-{size[0]}x{size[1]}" if data.cache_features else None
        decoded = ImageCache.from_config(data.get("image_cache"))

        def dataset(items, transform=None, full_mask=False) -> ScleraDataset:
            return ScleraDataset(items, size, transform, full_mask=full_mask, cache_view=view, image_cache=decoded)

        if stage == "fit":
            train = training_items(data, root, ("Training",), oversample=True)
            val = training_items(data, root, ("Validation",), oversample=False)
            return {"train": dataset(train, augment), "val": dataset(val)}
        if stage == "cv":
            items = training_items(data, root, SPLITS, oversample=False)
            return {"train": dataset(items, augment), "val": dataset(items)}
        if stage == "eval":
            return {"eval": dataset(evaluation_items(data, root, with_masks=True), full_mask=True)}
        if stage == "predict":
            return {"predict": dataset(evaluation_items(data, root, with_masks=False))}
        raise ValueError(f"stage={stage!r}: expected fit, cv, eval or predict")

    def cv_groups(self, dataset: Dataset) -> np.ndarray:
        return np.asarray([item.group for item in dataset.items])

    def build_model(self, stats: dict) -> nn.Module:
        encoder = maybe_cached(build_encoder(self.cfg), self.cfg, input_size=self.size)
        return instantiate(self.cfg.model, backbone=encoder, _convert_="all")

    def build_criterion(self, stats: dict) -> nn.Module:
        return instantiate(self.cfg.loss)

    def build_metric(self, stats: dict) -> Metric:
        return instantiate(self.cfg.metric)

    def _maps(self, outputs: Outputs, batch: Batch):
        """(index, Predictions uint8, Binarised uint8) per image at its original size."""
        probs = torch.sigmoid(outputs["logits"].float())[:, 0]
        for i in range(probs.shape[0]):
            size = (int(batch["height"][i]), int(batch["width"][i]))
            yield (i, *benchmark_maps(probs[i], size, float(self.cfg.metric.threshold)))

    def write_predictions(self, results: Iterable[tuple[Outputs, Batch]], out_dir: Path,
                          stats: dict) -> dict[str, Path]:
        """<out>/<track>/<set>/{Predictions,Binarised}/<stem>.png, greyscale at the image's size."""
        base = Path(out_dir) / str(self.cfg.task.track)
        written = 0
        for outputs, batch in results:
            for i, pred, binary in self._maps(outputs, batch):
                folder = base / batch["set"][i]
                save_atomic(Image.fromarray(pred), folder / "Predictions" / f"{batch['stem'][i]}.png")   # 2-D uint8: L
                save_atomic(Image.fromarray(binary), folder / "Binarised" / f"{batch['stem'][i]}.png")
                written += 1
        if not written:
            raise ValueError("no images to predict: the evaluation sets are empty")
        return {f"SSBC submission ({written} images)": base}

    def oof_rows(self, outputs: Outputs, batch: Batch, stats: dict) -> list[dict]:
        rows = batch_scores(outputs["logits"], batch, float(self.cfg.metric.threshold))
        return [{"set": batch["set"][i], "stem": batch["stem"][i], **row} for i, row in enumerate(rows)]

    def log_media(self, logger, outputs: Outputs, batch: Batch, stats: dict, step: int) -> None:
        count = min(int(self.cfg.task.media_images), outputs["logits"].shape[0])
        probs = torch.sigmoid(outputs["logits"][:count, 0].float()).cpu().numpy()
        pred = (probs >= float(self.cfg.metric.threshold)).astype(np.float32)
        masks = batch["mask"][:count, 0].cpu().numpy() if "mask" in batch else [None] * count
        images = [overlay(batch["image"][i].cpu(), pred[i], masks[i]) for i in range(count)]
        captions = [f"{batch['set'][i]}/{batch['stem'][i]} (red: predicted, green: truth)" for i in range(count)]
        logger.log_images("val/sclera_overlay", images, step, captions=captions)
