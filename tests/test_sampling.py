"""Weighted epoch sampling (common.data.sampling) and GPS-weighted roadwork sampling (roadwork.gps_sampling)."""
import numpy as np
import pytest
import torch

from common.data.sampling import WeightedEpochSampler
from roadwork import gps_sampling
from roadwork.regions import haversine_km


def test_draw_follows_weights_and_never_picks_zero_weight():
    weights = np.array([0.0, 1.0, 3.0, 6.0] * 500)
    drawn = WeightedEpochSampler(weights, 0, 1, seed=0, epoch=0).global_draw().numpy()
    assert len(drawn) == len(weights)
    assert (weights[drawn] > 0).all()
    share = np.bincount(drawn % 4, minlength=4) / len(drawn)
    np.testing.assert_allclose(share, [0.0, 0.1, 0.3, 0.6], atol=0.03)


def test_ranks_split_one_global_draw_and_epochs_differ():
    weights = np.random.default_rng(0).random(103)
    one = WeightedEpochSampler(weights, 0, 1, seed=5, epoch=2)
    ranks = [WeightedEpochSampler(weights, r, 2, seed=5, epoch=2) for r in range(2)]
    draw = ranks[0].global_draw()
    assert [list(r) for r in ranks] == [draw[0::2].tolist(), draw[1::2].tolist()]
    assert len(ranks[0]) == len(ranks[1]) == 51
    assert list(one) == list(WeightedEpochSampler(weights, 0, 1, seed=5, epoch=2))      # seeded
    assert list(one) != list(WeightedEpochSampler(weights, 0, 1, seed=5, epoch=3))      # a new draw each epoch
    resumed = WeightedEpochSampler(weights, 0, 1, seed=5, epoch=2, skip=40)
    assert list(resumed) == list(one)[40:] and len(resumed) == 103 - 40


@pytest.mark.parametrize("bad", [[1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError, match="sampling weight"):
        WeightedEpochSampler(np.array(bad), 0, 1, 0, 0)


def test_trainer_loader_uses_the_weights(tmp_path):
    from omegaconf import OmegaConf

    from common.cluster.distributed import DistContext
    from common.tracking.tracker import Tracker
    from common.training.trainer import Trainer
    cfg = OmegaConf.create({"seed": 3, "data": {"batch_size": 4, "num_workers": 0},
                            "trainer": {"precision": "fp32", "progress": "off", "pin_memory": False}})
    trainer = Trainer(cfg, tmp_path, Tracker(), DistContext())
    data = torch.arange(8)
    weights = np.array([0, 0, 0, 1.0, 0, 0, 0, 1.0])
    seen = torch.cat(list(trainer.loader(data, torch.stack, train=True, epoch=1, weights=weights)))
    assert set(seen.tolist()) <= {3, 7} and len(seen) == 8


def test_region_centres_recover_clusters_across_the_antimeridian():
    rng = np.random.default_rng(0)
    berlin = np.array([52.52, 13.40]) + rng.normal(0, 0.05, (40, 2))
    fiji = np.array([-17.7, 179.95]) + rng.normal(0, 0.05, (40, 2))
    fiji[:, 1] = (fiji[:, 1] + 180) % 360 - 180                  # some points wrap to -179.9x
    centres = gps_sampling.region_centres(np.concatenate([berlin, fiji]), clusters=2, seed=0)
    to_truth = haversine_km(centres, np.array([[52.52, 13.40], [-17.7, 179.95]]))
    assert np.sort(to_truth.min(1)).max() < 15.0                 # each centre within 15 km of a true cluster


def test_brackets_and_weights_by_hand():
    centres = np.array([[0.0, 0.0]])
    # 1 degree of latitude is ~111.2 km on the 6371 km sphere
    gps = np.array([[0.1, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0, 0.0]])
    known = np.array([True, True, True, False])
    bracket = gps_sampling.brackets(gps, known, centres, [25, 100])
    assert bracket.tolist() == [0, 1, 2, -1]                     # 11 km, 56 km, 222 km, unknown
    weights = gps_sampling.bracket_weights(bracket, [4.0, 2.0, 1.0], unknown_weight=0.5)
    assert weights.tolist() == [4.0, 2.0, 1.0, 0.5]
    table = gps_sampling.distance_check(bracket, np.array([0, 0, 0, 3]), [25, 100])
    rows = {line.split()[0]: line.split()[-2:] for line in table.splitlines()[1:]}
    assert rows["0-25"] == ["25.0%", "75.0%"] and rows["unknown"] == ["25.0%", "25.0%"]


def test_reference_coordinates_from_csv_and_sidecars(tmp_path):
    (tmp_path / "ref.csv").write_text("lat,lon\n52.5,13.4\n,\n48.8,2.3\n")
    np.testing.assert_allclose(gps_sampling.read_reference_coordinates(tmp_path / "ref.csv"),
                               [[52.5, 13.4], [48.8, 2.3]])
    folder = tmp_path / "side"
    folder.mkdir()
    (folder / "a.json").write_text('{"gps": "35.6,139.7", "label": 1}')
    (folder / "b.json").write_text('{"gps": null}')
    np.testing.assert_allclose(gps_sampling.read_reference_coordinates(folder), [[35.6, 139.7]])
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv.*lat,lon"):
        gps_sampling.read_reference_coordinates(tmp_path / "bad.csv")
    (tmp_path / "range.csv").write_text("gps\n\"95,1\"\n")
    with pytest.raises(ValueError, match="range.csv row 2"):
        gps_sampling.read_reference_coordinates(tmp_path / "range.csv")


class _Augmented(torch.utils.data.Dataset):
    """Item i: the brightness factor a random albumentations draw applied to a constant image."""

    def __init__(self):
        import albumentations as A
        self.pipeline = A.Compose([A.RandomBrightnessContrast(brightness_limit=0.5, contrast_limit=0.0, p=1.0)])

    def __len__(self):
        return 8

    def __getitem__(self, index):
        image = np.full((4, 4, 3), 100, dtype=np.uint8)
        return torch.tensor(float(self.pipeline(image=image)["image"].mean()))


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_draws_differ_per_epoch_and_worker_and_repeat_per_seed(tmp_path, workers):
    from omegaconf import OmegaConf

    from common.cluster.distributed import DistContext
    from common.tracking.tracker import Tracker
    from common.training.trainer import Trainer
    from common.utils.seed import seed_everything
    cfg = OmegaConf.create({"seed": 3, "data": {"batch_size": 4, "num_workers": workers},
                            "trainer": {"precision": "fp32", "progress": "off", "pin_memory": False}})
    trainer = Trainer(cfg, tmp_path, Tracker(), DistContext())

    def epoch(e):
        seed_everything(100 + e)                   # what the fit loop does at the start of each epoch
        return torch.cat(list(trainer.loader(_Augmented(), torch.stack, train=False, epoch=e))).tolist()

    first, second = epoch(0), epoch(1)
    assert first != second                         # a new draw each epoch
    assert first == epoch(0)                       # reproducible from the seed
    if workers:
        assert first[:4] != first[4:]              # the two workers (a batch each) do not replay one sequence


def test_training_weights_travel_with_the_dataset_and_follow_subsets():
    """A training dataset's `sample_weights` (one per item) reach the trainer through sample_weights_of, in the
    order of the (nested) Subsets mode=cv cuts from it; a dataset without them shuffles (None)."""
    from torch.utils.data import Subset, TensorDataset

    from common.data.datasets import sample_weights_of
    base = TensorDataset(torch.arange(6))
    assert sample_weights_of(base) is None
    base.sample_weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    fold = Subset(Subset(base, [5, 3, 1, 0]), [2, 0])
    assert sample_weights_of(fold).tolist() == [2.0, 6.0]
    assert sample_weights_of(base).tolist() == base.sample_weights
