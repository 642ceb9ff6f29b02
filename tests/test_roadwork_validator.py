"""Validator-exact scoring (roadwork.validator) against a separate reimplementation of the live validator's
tracker and reward (natixnetwork/streetvision-subnet: a deque of the last 100, np.round, MCC floored at 0
and 0 for one class, reward = (0.5 MCC_100 + 0.5 acc_10) ** 3)."""
from collections import deque

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import matthews_corrcoef

from roadwork.validator import reward_stream, stream_order, validator_round, validator_scores

RULES = dict(mcc_window=100, accuracy_window=10, mcc_weight=0.5, accuracy_weight=0.5, exponent=3.0)


class ReferenceTracker:
    """The validator's bookkeeping for one miner, written from its description."""

    def __init__(self):
        self.preds, self.labels = deque(maxlen=100), deque(maxlen=100)

    def update(self, prob, label):
        self.preds.append(prob)
        self.labels.append(label)

    def metrics(self, window):
        preds, labels = list(self.preds)[-window:], list(self.labels)[-window:]
        rounded = [round(p) if abs(p - 0.5) > 1e-12 else 0 for p in preds]   # Python round: half to even too
        acc = float(np.mean([p == y for p, y in zip(rounded, labels)]))
        mcc = max(0.0, matthews_corrcoef(labels, rounded)) if len(set(labels)) > 1 else 0.0
        return mcc, acc

    def reward(self, prob, label):
        self.update(prob, label)
        mcc, _ = self.metrics(100)
        _, acc = self.metrics(10)
        return (0.5 * mcc + 0.5 * acc) ** 3


def reference_rewards(labels, probs):
    tracker = ReferenceTracker()
    return np.array([tracker.reward(p, y) for p, y in zip(probs, labels)])


def test_half_is_no_roadwork_and_issue_example():
    assert validator_round([0.5, 0.5000001, 0.4999, 1.0, 0.0]).tolist() == [0, 1, 0, 1, 0]
    curve = reward_stream([0, 0, 1, 1], [0.5, 0.1, 0.9, 0.9], **RULES)
    assert curve["prediction"].tolist() == [0, 0, 1, 1]
    assert curve["mcc"][-1] == 1.0 and curve["reward"][-1] == 1.0


def test_single_class_windows_score_zero_mcc():
    curve = reward_stream([1, 1, 1], [0.9, 0.8, 0.2], **RULES)
    assert curve["mcc"].tolist() == [0.0, 0.0, 0.0]
    assert curve["reward"].tolist() == pytest.approx([(0.5 * 1) ** 3, (0.5 * 1) ** 3, (0.5 * 2 / 3) ** 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_matches_reference_tracker(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 260)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, 260), 0, 1)
    probs[rng.random(260) < 0.1] = 0.5                     # exact ties: "no roadwork"
    labels[:15] = 1                                        # a single-class opening window
    curve = reward_stream(labels, probs, **RULES)
    np.testing.assert_allclose(curve["reward"], reference_rewards(labels, probs), atol=1e-12)


def test_orders_and_summary():
    labels = np.array([0, 1] * 20)
    probs = np.where(labels == 1, 0.8, 0.3)
    cfg = OmegaConf.create({**RULES, "order": "shuffle", "seed": 3, "length": None})
    summary, curve = validator_scores(labels, probs, cfg)
    assert sorted(curve["index"].tolist()) == list(range(40))
    assert summary["reward"] == 1.0 and summary["reward_mean"] == pytest.approx(curve["reward"].mean())
    drawn = stream_order(labels, "validator", 0, 1000)
    assert len(drawn) == 1000 and abs(labels[drawn].mean() - 0.5) < 0.06
    assert stream_order(labels, "input", 0, None).tolist() == list(range(40))
    with pytest.raises(ValueError, match="order"):
        stream_order(labels, "random", 0, None)


def test_no_answer_is_left_out_of_the_windows_as_the_tracker_does():
    """The tracker takes the last N entries, then drops those equal to -1 before MCC / accuracy; other values
    outside [0, 1] stay in (rounded); every out-of-range step's reward is 0."""
    labels = [1, 0, 1, 0, 1]
    probs = [0.9, -1.0, 0.8, 1.3, 0.2]
    curve = reward_stream(labels, probs, mcc_window=100, accuracy_window=3, mcc_weight=0.5, accuracy_weight=0.5,
                          exponent=1.0)
    kept_l, kept_p = [1, 1, 0, 1], [1, 1, 1, 0]                          # -1 left out, 1.3 rounds to 1
    assert curve["accuracy"][-1] == pytest.approx(1 / 3)                 # last 3: (1, 0.8) (0, 1.3) (1, 0.2)
    assert curve["mcc"][-1] == pytest.approx(max(0.0, matthews_corrcoef(kept_l, kept_p)))
    assert curve["accuracy"][1] == 1.0 and curve["reward"][1] == 0.0 and curve["reward"][3] == 0.0
    only_missing = reward_stream([1], [-1.0], **RULES)
    assert only_missing["accuracy"][0] == 0.0 and only_missing["reward"][0] == 0.0


def test_benchmark_streams_in_the_validators_order_by_default():
    from hydra import compose, initialize_config_dir

    from tests.cli import REPO
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["task=roadwork"])
    assert cfg.metric.validator.order == "validator" and cfg.metric.validator.no_answer == -1.0
    labels = np.array([0] * 30 + [1] * 10)
    drawn = stream_order(labels, "validator", 7, None)
    rng = np.random.default_rng(7)                                       # the same draws, written out
    classes = rng.integers(0, 2, 40)
    expected = [np.flatnonzero(labels == c)[rng.integers((labels == c).sum())] for c in classes]
    assert drawn.tolist() == expected
