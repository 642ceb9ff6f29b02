"""The sclera task: CGDSeg binary sclera segmentation on the SSBC layout, scored as SSBC scores it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from common.data.augment import build_augment
from common.data.cached_encoder import encoder_for, feature_cache_of
from common.data.image_cache import ImageCache
from common.metric import Metric
from common.models.option_groups import instantiate_grouped
from common.task import Batch, Outputs, Task
from common.utils.atomic import atomic_write_text
from sclera.data import ScleraDataset
from sclera.grounding import resolve_sources
from sclera.metric import batch_scores
from sclera.model import CGDSeg
from sclera.outputs import write_submission
from sclera.plots import overlay
from sclera.sets import SPLITS, evaluation_items, training_items
from sclera.synth import write_dataset

log = logging.getLogger(__name__)

TRACKS = ("Synthetic", "Mixed")


class ScleraTask(Task):
    INFERENCE_KEYS = ("submission",)   # predict writes this run's team name and size

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        if cfg.task.track not in TRACKS:
            raise ValueError(f"task.track={cfg.task.track!r}: expected one of {TRACKS} (the SSBC training track)")
        self.root: Optional[Path] = None        # the dataset root of the last datasets() call

    @property
    def size(self) -> tuple[int, int]:
        return int(self.cfg.data.image_size[0]), int(self.cfg.data.image_size[1])

    def synthesize(self, root: Path, seed: int) -> None:
        s = self.cfg.data.synth
        write_dataset(Path(root), seed, int(s.train_per_set), int(s.val_per_set), int(s.eval_per_set),
                      text_model=s.text_model)

    def datasets(self, root: Path, stage: str, model=None) -> dict[str, Dataset]:
        data, size = self.cfg.data, self.size
        self.root = Path(root)
        # training only; cached backbone tokens are of the clean, resized image: no pixel augmentation then
        augment = None if data.cache_features or stage not in ("fit", "cv") else build_augment(data.augment)
        view = f"resized-{size[0]}x{size[1]}" + ("" if data.image_resize == "pil_bilinear" else f"-{data.image_resize}")
        view = view if data.cache_features else None
        decoded = ImageCache.from_config(data.get("image_cache"))
        features = feature_cache_of(self.cfg, size)

        def dataset(items, transform=None, full_mask=False) -> ScleraDataset:
            return ScleraDataset(items, size, transform, full_mask=full_mask, cache_view=view, image_cache=decoded,
                                 image_resize=data.image_resize, feature_cache=features)

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

    def _dataset_root(self) -> Path:
        if self.root is None:                   # eval / predict build the model before reading data
            from common.training.dataset_root import data_root
            self.root = data_root(self.cfg, self)
        return self.root

    def build_model(self, stats: dict) -> nn.Module:
        """CGDSeg; grounding sources relative to the dataset root are read from there. Prints the trainable
        parameters per component and writes them to <run dir>/parameters.json."""
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        model_cfg["grounding"] = resolve_sources(model_cfg["grounding"], self._dataset_root)
        encoder = encoder_for(self.cfg, input_size=self.size)
        model = instantiate_grouped(model_cfg, CGDSeg, backbone=encoder)
        report = model.parameter_report()
        log.info("[model] CGDSeg trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in report.items()))
        if HydraConfig.initialized():
            atomic_write_text(Path(HydraConfig.get().runtime.output_dir) / "parameters.json",
                              json.dumps(report, indent=2) + "\n")
        return model

    def build_criterion(self, stats: dict) -> nn.Module:
        return instantiate(self.cfg.loss)

    def build_metric(self, stats: dict) -> Metric:
        return instantiate(self.cfg.metric)

    def check_prediction_group(self, label: str) -> None:
        if label != self.cfg.task.track:
            raise ValueError(f"ckpt_path.{label}: the checkpoint was trained for track {self.cfg.task.track!r} "
                             f"(its task.track); list it under ckpt_path.{self.cfg.task.track}")

    def write_predictions(self, results: Iterable[tuple[Outputs, Batch]], dataset: Dataset, out_dir: Path,
                          stats: dict) -> dict[str, Path]:
        """The SSBC submission (sclera.outputs) under <out>/<team>/<track>."""
        sub = self.cfg.task.submission
        base = Path(out_dir) / str(sub.team) / str(self.cfg.task.track)
        written = write_submission(results, base, (int(sub.size[0]), int(sub.size[1])),
                                   float(self.cfg.metric.threshold))
        sets = ", ".join(f"{name} {count}" for name, count in sorted(written.items()))
        return {f"SSBC submission, track {self.cfg.task.track} ({sets} images)": base}

    def oof_rows(self, outputs: Outputs, batch: Batch, stats: dict) -> list[dict]:
        rows = batch_scores(outputs["logits"], batch, float(self.cfg.metric.threshold))
        return [{"set": batch["set"][i], "stem": batch["stem"][i], **row} for i, row in enumerate(rows)]

    def log_media(self, logger, outputs: Outputs, batch: Batch, stats: dict, step: int) -> None:
        if not isinstance(batch["image"], torch.Tensor):
            log.info("[media] val/sclera_overlay not drawn: the batch carries cached backbone features, not the images "
                     "(data.cache_features=true)")
            return
        count = min(int(self.cfg.task.media_images), outputs["logits"].shape[0])
        probs = torch.sigmoid(outputs["logits"][:count, 0].float()).cpu().numpy()
        pred = (probs >= float(self.cfg.metric.threshold)).astype(np.float32)
        masks = batch["mask"][:count, 0].cpu().numpy() if "mask" in batch else [None] * count
        images = [overlay(batch["image"][i].cpu(), pred[i], masks[i]) for i in range(count)]
        captions = [f"{batch['set'][i]}/{batch['stem'][i]} (red: predicted, green: truth)" for i in range(count)]
        logger.log_images("val/sclera_overlay", images, step, captions=captions)
