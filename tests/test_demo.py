"""The demo's pieces that do not train: task discovery, scores files, the summary table."""
import json

from common.runs.demo import print_table, registered_tasks, scored_value
from tests.cli import REPO


def test_registered_tasks_are_the_task_configs():
    assert registered_tasks() == sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml"))
    assert {"biomass", "sclera", "roadwork"} <= set(registered_tasks())


def test_scored_value_reads_the_metric_of_a_scores_file(tmp_path):
    scores = tmp_path / "submission_scores.json"
    scores.write_text(json.dumps({"r2_weighted": 0.91234, "r2/Dry_Green_g": 0.5}))
    assert scored_value(scores, "r2_weighted") == "0.9123"
    assert scored_value(scores, "mcc") == "-"
    assert scored_value(tmp_path / "submission.csv", "r2_weighted") == "-"


def test_summary_table_lists_every_row(capsys):
    print_table([("biomass", "eval/r2_weighted", "0.9874", "/x/metrics.json"), ("sclera", "eval/f1", "0.94", "/y")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "value", "output"] and len(lines) == 4
    assert lines[2].split() == ["biomass", "eval/r2_weighted", "0.9874", "/x/metrics.json"]
