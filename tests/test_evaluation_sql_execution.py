"""NL2SQL execution accuracy (SPEC.md section 5, domain metric) on a hand-made database."""
import sqlite3

import pytest

from replay_megatron.evaluation.sql_execution import SQLExecutionError, execution_accuracy, execution_matches, same_result


@pytest.fixture()
def db_dir(tmp_path):
    conn = sqlite3.connect(tmp_path / "db0.sqlite")
    with conn:
        conn.execute("CREATE TABLE staff (name TEXT, dept TEXT, pay INTEGER)")
        conn.executemany("INSERT INTO staff VALUES (?, ?, ?)",
                         [("ann", "sales", 10), ("bob", "sales", 30), ("cara", "legal", 20), ("dan", "legal", 25)])
    conn.close()
    return tmp_path


def _acc(pred: str, gold: str, db_dir) -> float:
    return execution_accuracy([pred], [{"id": "s0", "db_id": "db0", "response": gold}], db_dir)


LIST_SALES = "SELECT name FROM staff WHERE dept = 'sales'"
ARGMAX = "SELECT name FROM staff ORDER BY pay DESC LIMIT 1"


@pytest.mark.parametrize("pred,gold,expected", [
    (LIST_SALES, LIST_SALES, 1.0),
    ("SELECT name FROM staff WHERE pay IN (10, 30) ORDER BY name DESC", LIST_SALES, 1.0),  # unordered gold
    ("SELECT name FROM staff WHERE dept = 'legal'", LIST_SALES, 0.0),
    ("SELECT name, dept FROM staff WHERE dept = 'sales'", LIST_SALES, 0.0),  # extra column
    ("SELECT name FROM staff", LIST_SALES, 0.0),  # superset
    ("SELECT name FROM staff WHERE dept = 'sales' UNION ALL SELECT 'ann'", LIST_SALES, 0.0),  # multiset
    ("SELECT AVG(pay) FROM staff", "SELECT SUM(pay) * 1.0 / COUNT(*) FROM staff", 1.0),  # floats
    ("SELECT COUNT(*) FROM staff WHERE pay > 15", "SELECT COUNT(*) FROM staff WHERE pay >= 20", 1.0),
    ("SELECT name FROM staff ORDER BY pay DESC", "SELECT name FROM staff ORDER BY pay DESC", 1.0),
    ("SELECT name FROM staff ORDER BY pay ASC", "SELECT name FROM staff ORDER BY pay DESC", 0.0),  # order matters
    (ARGMAX, ARGMAX, 1.0),
    ("SELEC name FROM staff", LIST_SALES, 0.0),  # syntax error
    ("SELECT name FROM nowhere", LIST_SALES, 0.0),  # unknown table
    ("", LIST_SALES, 0.0),
    (f"{LIST_SALES}; {LIST_SALES}", LIST_SALES, 0.0),  # two statements
    ("SELECT name FROM staff WHERE dept = 'sales\x00'", LIST_SALES, 0.0),  # NUL character
])
def test_execution_match(pred, gold, expected, db_dir):
    assert _acc(pred, gold, db_dir) == expected


def test_accuracy_is_the_fraction_of_matches(db_dir):
    samples = [{"id": i, "db_id": "db0", "response": LIST_SALES} for i in range(4)]
    preds = [LIST_SALES, "bad sql", LIST_SALES, "SELECT 1"]
    assert execution_matches(preds, samples, db_dir) == [True, False, True, False]
    assert execution_accuracy(preds, samples, db_dir) == 0.5
    with pytest.raises(ValueError, match="at least one sample"):
        execution_accuracy([], [], db_dir)


def test_predictions_cannot_write_or_create_files(db_dir, tmp_path_factory):
    before = (db_dir / "db0.sqlite").read_bytes()
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "other.sqlite"
    for pred in ("DELETE FROM staff", "DROP TABLE staff", "INSERT INTO staff VALUES ('x', 'y', 1)",
                 "CREATE TABLE t (a)", f"ATTACH DATABASE '{elsewhere}' AS o", "PRAGMA query_only = OFF"):
        assert _acc(pred, LIST_SALES, db_dir) == 0.0
    assert (db_dir / "db0.sqlite").read_bytes() == before
    assert sorted(p.name for p in db_dir.iterdir()) == ["db0.sqlite"]
    assert not elsewhere.exists()


def test_runaway_query_is_stopped_by_the_time_limit(db_dir):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
    samples = [{"id": 0, "db_id": "db0", "response": LIST_SALES}]
    assert execution_accuracy([endless], samples, db_dir, timeout_s=0.2) == 0.0


def test_failing_gold_and_missing_database_raise_with_names(db_dir):
    with pytest.raises(SQLExecutionError, match="'broken'.*db0"):
        execution_accuracy([LIST_SALES], [{"id": "broken", "db_id": "db0", "response": "SELEC"}], db_dir)
    with pytest.raises(FileNotFoundError, match="nope.sqlite"):
        execution_accuracy([LIST_SALES], [{"id": 1, "db_id": "nope", "response": LIST_SALES}], db_dir)
    with pytest.raises(ValueError, match="2 predictions for 1 samples"):
        execution_accuracy([LIST_SALES] * 2, [{"id": 1, "db_id": "db0", "response": LIST_SALES}], db_dir)


def test_same_result_compares_floats_to_six_decimals():
    assert same_result([(1 / 3,)], [(0.3333333,)], ordered=False)
    assert not same_result([(0.33,)], [(1 / 3,)], ordered=False)
    assert same_result([(2,)], [(2.0,)], ordered=True)
