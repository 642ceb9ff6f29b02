"""Heterogeneous roadwork ensembles: members with other views, pruning, widths predict on their own inputs
and are combined on probabilities or logits; top-k checkpoint selection by validation value."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from common.inference.ensemble import top_k_indices
from common.runs import app
from roadwork.ensemble import RoadworkEnsemble, member_batch
from roadwork.task import RoadworkTask

REPO = Path(__file__).resolve().parents[1]
SMALL = ["task=roadwork", "trainer=debug", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
         "trainer.limit_val_batches=1", "data.num_workers=0", "data.view_size=28", "logger=none",
         "data.synth.splits.train.count=12", "data.synth.splits.val.count=6", "data.synth.splits.test.count=5",
         "data.synth.splits.train224.count=2", "data.synth.splits.val224.count=2", "data.batch_size=6"]
MEMBERS = {"single": ["data.views=single", "model.width=32"],
           "tiles": ["data.views=[global,center,tile_00,tile_11]", "model.prune_k=2", "model.width=48",
                     "model.num_heads=2", "data.metadata=[weather]"]}
CONVNEXT = ["backbone=convnextv2_b", "backbone.name=convnextv2_atto", "backbone.weights=null", "backbone.layers=[-1]",
            "model.pool=meanmax", "data.view_size=64", "data.views=single", "model.width=32", "data.metadata=[]"]


def _cfg(overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_members_get_their_own_inputs_and_combine_on_prob_or_logit():
    torch.manual_seed(0)
    a = RoadworkTask(_cfg(SMALL + MEMBERS["single"])).build_model({}).eval()
    b = RoadworkTask(_cfg(SMALL + MEMBERS["tiles"])).build_model({}).eval()
    c = RoadworkTask(_cfg(SMALL + CONVNEXT)).build_model({}).eval()          # a random ConvNeXt-V2 (atto)
    assert a.input_spec != b.input_spec != c.input_spec
    batch = {"views": torch.rand(3, 1, 3, 28, 28), "image": ["x", "y", "z"], "label": torch.tensor([0, 1, 0]),
             "m1/views": torch.rand(3, 4, 3, 28, 28), "m1/weather": torch.tensor([0, 2, 1]),
             "m2/views": torch.rand(3, 1, 3, 64, 64)}
    for key in ("weather", "daytime", "scene"):
        batch[key] = torch.zeros(3, dtype=torch.long)
    batch.update(gps=torch.zeros(3, 2), gps_known=torch.zeros(3))
    with torch.no_grad():
        pa = a(batch)["prob"]
        pb = b({"views": batch["m1/views"], "weather": batch["m1/weather"]})["prob"]
        pc = c({"views": batch["m2/views"]})["prob"]
        mean = RoadworkEnsemble([a, b, c], [0.25, 0.5, 0.25], "prob", 1e-6)(batch)
        logit = RoadworkEnsemble([a, b, c], None, "logit", 1e-6)(batch)
    torch.testing.assert_close(mean["prob"], 0.25 * pa + 0.5 * pb + 0.25 * pc)
    torch.testing.assert_close(logit["prob"], torch.sigmoid((torch.logit(pa) + torch.logit(pb) + torch.logit(pc)) / 3))
    assert member_batch(batch, 0) is batch and set(member_batch(batch, 1)) == {"views", "weather", "image", "label"}
    with pytest.raises(ValueError, match="combine"):
        RoadworkEnsemble([a, b], None, "vote", 1e-6)


def test_top_k_by_validation_value():
    def ckpt(value, direction="maximize"):
        return {"fit_state": {"best_value": value}, "config": {"trainer": {"monitor_direction": direction}}}
    values = [0.962, 0.971, 0.968, 0.965, 0.969]                # the plan's example: folds 2, 5, 3 kept
    assert top_k_indices([(str(i), ckpt(v)) for i, v in enumerate(values)], 3) == [1, 2, 4]
    assert top_k_indices([("a", ckpt(0.3, "minimize")), ("b", ckpt(0.1, "minimize"))], 1) == [1]
    with pytest.raises(ValueError, match="top_k=6"):
        top_k_indices([(str(i), ckpt(v)) for i, v in enumerate(values)], 6)


@pytest.mark.slow
def test_predict_with_heterogeneous_members_end_to_end(tmp_path):
    cache = tmp_path / "cache"

    def run(name, overrides):
        cfg = _cfg([*SMALL, *overrides, f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path / name}",
                    f"paths.cache_dir={cache}"])
        app.run(cfg)
        return tmp_path / name

    ckpts = [run(name, extra) / "checkpoints" / "best.pt" for name, extra in MEMBERS.items()]
    singles = [pd.read_csv(run(f"pred_{k}", ["mode=predict", f"ckpt_path={c}"]) / "predictions.csv")
               for k, c in enumerate(ckpts)]
    both = pd.read_csv(run("pred_both", ["mode=predict", f"ckpt_path=[{ckpts[0]},{ckpts[1]}]"]) / "predictions.csv")
    assert len(both) == 5 and (both["image"] == singles[0]["image"]).all()
    logit = [np.log(single["probability"] / (1 - single["probability"])) for single in singles]
    expected = 1 / (1 + np.exp(-(logit[0] + logit[1]) / 2))          # the default: the mean of the members' logits
    np.testing.assert_allclose(both["probability"], expected, atol=1e-5)
    top = pd.read_csv(run("pred_top", ["mode=predict", "inference.top_k=1", f"ckpt_path=[{ckpts[0]},{ckpts[1]}]"])
                      / "predictions.csv")
    assert len(top) == 5
