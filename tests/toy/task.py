"""A toy regression task for the trainer and app tests: y = <w, mean patch token of a tiny image> + noise."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.metric import Metric
from common.models.encoder import build_encoder
from common.task import Task


class ToyDataset(Dataset):
    def __init__(self, root: Path, split: str):
        data = np.load(root / f"{split}.npz")
        self.images, self.targets = data["images"], data["targets"]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": torch.from_numpy(self.images[i]), "target": torch.tensor(self.targets[i]), "id": f"item{i}"}


class ToyModel(nn.Module):
    def __init__(self, backbone, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.embed_dim, 1))

    def forward(self, batch):
        tokens = self.backbone(batch["image"]).tokens[-1]
        return {"pred": self.head(tokens.mean(1)).squeeze(1)}


class ToyCriterion(nn.Module):
    def __init__(self, poison_after: int | None = None, sleep_s: float = 0.0):
        super().__init__()
        self.poison_after, self.sleep_s, self.calls = poison_after, sleep_s, 0

    def forward(self, outputs, batch):
        self.calls += 1
        if self.training and self.sleep_s:
            time.sleep(self.sleep_s)  # a slow step, so that tests can signal a run mid-epoch
        loss = ((outputs["pred"] - batch["target"]) ** 2).mean()
        if self.training and self.poison_after is not None and self.calls > self.poison_after:
            loss = loss * float("nan")
        return {"mse": loss}


class ToyMetric(Metric):
    def update(self, outputs, batch):
        self.add(pred=outputs["pred"], target=batch["target"])

    def compute(self):
        g = self.gathered()
        return {"neg_mse": -float(np.mean((g["pred"] - g["target"]) ** 2))}


class ToyTask(Task):
    def synthesize(self, root: Path, seed: int) -> None:
        rng = np.random.default_rng(seed)
        root.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 24), ("val", 8)):
            brightness = rng.uniform(0, 1, size=n).astype(np.float32)
            images = np.repeat(brightness[:, None, None, None], 3, 1) * np.ones((1, 3, 28, 28), np.float32)
            np.savez(root / f"{split}.npz", images=images, targets=(2 * brightness - 1).astype(np.float32))
        (root / "info.json").write_text(json.dumps({"seed": seed}))

    def datasets(self, root: Path, stage: str, model=None):
        if stage in ("fit", "cv"):
            train = ToyDataset(root, "train")
            return {"train": train, "val": ToyDataset(root, "val") if stage == "fit" else train}
        return {stage: ToyDataset(root, "val")}

    def cv_groups(self, dataset):
        return np.arange(len(dataset)) // 2

    def build_model(self, stats):
        return ToyModel(build_encoder(self.cfg), dropout=float(self.cfg.model.dropout))

    def build_criterion(self, stats):
        return ToyCriterion(poison_after=self.cfg.loss.poison_after, sleep_s=self.cfg.loss.sleep_s)

    def build_metric(self, stats):
        return ToyMetric()

    def write_predictions(self, results, dataset, out_dir, stats):
        rows = [f"{i},{p:.6f}" for outputs, batch in results for i, p in zip(batch["id"], outputs["pred"].tolist())]
        path = Path(out_dir) / "predictions.csv"
        path.write_text("id,pred\n" + "\n".join(rows) + "\n")
        return {"predictions": path}

    def oof_rows(self, outputs, batch, stats):
        return [{"id": i, "pred": float(p), "target": float(t)}
                for i, p, t in zip(batch["id"], outputs["pred"], batch["target"])]
