"""JournalStorage (journal:///path): a study in one append-only file on a shared filesystem, no database server.
It exists from optuna 3.1 on; on the pinned optuna 2.10 the suite refuses such a URL by name."""
import optuna
import pytest
from optuna.trial import TrialState

from sweeps.storage import load_study, make_storage
from tests.test_sweeps import _worker

HAS_JOURNAL = hasattr(getattr(optuna.storages, "journal", None), "JournalFileBackend")


@pytest.mark.skipif(HAS_JOURNAL, reason="this optuna has JournalStorage: the two-worker test covers it")
def test_journal_url_refused_by_name_without_journal_storage(tmp_path):
    with pytest.raises(ValueError, match=r"journal:///.*toy.log: JournalStorage needs optuna >= 4 \(installed: 2\."):
        make_storage(f"journal:///{tmp_path / 'toy.log'}")


@pytest.mark.skipif(not HAS_JOURNAL, reason=f"optuna {optuna.__version__} has no JournalStorage (needs >= 4)")
def test_two_workers_on_one_journal_file(tmp_path):
    url = f"journal://{tmp_path / 'shared' / 'toy_lr.log'}"
    beat = ["hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=30"]
    workers = [_worker(tmp_path, f"j{i}", ["hydra.sweeper.budget=3", f"hydra.sweeper.storage={url}", *beat], popen=True)
               for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    trials = load_study(url, "toy_lr").trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert {t.user_attrs["worker"] for t in trials} <= {"j0", "j1"}


@pytest.mark.skipif(not HAS_JOURNAL, reason=f"optuna {optuna.__version__} has no JournalStorage (needs >= 4)")
def test_two_workers_racing_for_orphans_on_a_journal_file(tmp_path):
    """sweeps.ownership's lock-file compare-and-set on a real journal file: each orphan is adopted exactly once."""
    from sweeps import ownership
    from tests.test_sweep_adoption import race_for_orphans
    url = f"journal:///{tmp_path / 'study.log'}"
    race_for_orphans(url, ownership.lock_for(url))
