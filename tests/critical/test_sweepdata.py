"""Tests of reading sweep files and deriving steps-to-goal from loss curves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from noisescale.critical.report import FitSettings, fit_sweep
from noisescale.critical.sweepdata import COLUMNS, load_sweep
from noisescale.errors import SweepDataError

RUNS = [(16, 32000), (64, 9000), (256, 3000), (1024, 1500)]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def curve_records() -> list[dict]:
    """Two learning rates per batch size, loss = 1 + 3 exp(-step / tau), tau on the hyperbola.

    The lr=0.3 runs are 1.3x faster, so they must be the ones kept; runs log every 50 steps.
    """
    rows = []
    for b in (16, 64, 256, 1024):
        for lr, slow in ((0.1, 1.3), (0.3, 1.0)):
            tau = 1000 * (1 + 500 / b) * slow
            for step in range(0, 40001, 50):
                loss = 1 + 3 * np.exp(-step / tau)
                rows.append({"batch_size": b, "step": step, "loss": loss, "lr": lr, "run": f"b{b}-lr{lr}",
                             "b_simple": 100 / loss})  # fmt: skip
    return rows


def test_per_run_csv_and_jsonl_read_the_same(tmp_path: Path) -> None:
    csv = write(tmp_path / "runs.csv", "batch_size,steps\n" + "".join(f"{b},{s}\n" for b, s in RUNS))
    jsonl = write_jsonl(tmp_path / "runs.txt", [{"batch_size": b, "steps": s} for b, s in RUNS])
    a, b = load_sweep(csv), load_sweep(jsonl)
    pd.testing.assert_frame_equal(a, b)
    assert a["batch_size"].tolist() == [16.0, 64.0, 256.0, 1024.0]
    assert a["reached"].all() and a["goal"].isna().all()


def test_json_array_and_blank_lines(tmp_path: Path) -> None:
    arr = write(tmp_path / "runs.json", json.dumps([{"batch_size": b, "steps": s} for b, s in RUNS]))
    assert len(load_sweep(arr)) == 4
    csv = write(tmp_path / "gaps.csv", "batch_size,steps\n16,100\n\n64,abc\n")
    with pytest.raises(SweepDataError, match="line 4: column `steps` \\('abc'\\) is not a number"):
        load_sweep(csv)


def test_goal_column_selection_and_order(tmp_path: Path) -> None:
    text = "goal,batch_size,steps\n3.0,64,3500\n3.0,16,12000\n2.0,16,32000\n2.0,64,9000\n"
    path = write(tmp_path / "runs.csv", text)
    df = load_sweep(path)
    assert df["goal"].tolist() == [3.0, 3.0, 2.0, 2.0]  # goals in file order, batch sizes sorted
    assert df["batch_size"].tolist() == [16.0, 64.0, 16.0, 64.0]
    assert load_sweep(path, [2.0])["goal"].unique().tolist() == [2.0]
    with pytest.raises(SweepDataError, match=r"goal 1\.5 is not in the file \(goals there: 3, 2\)"):
        load_sweep(path, [1.5])


def test_reached_column_marks_censored_runs(tmp_path: Path) -> None:
    path = write(
        tmp_path / "runs.csv", "batch_size,steps,reached\n16,20000,false\n64,9000,TRUE\n256,3000,1\n"
    )
    assert load_sweep(path)["reached"].tolist() == [False, True, True]
    bad = write(tmp_path / "bad.csv", "batch_size,steps,reached\n16,20000,maybe\n")
    with pytest.raises(SweepDataError, match="line 2: column `reached` is 'maybe'"):
        load_sweep(bad)


def test_per_run_duplicates_name_the_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.csv", "batch_size,steps\n16,100\n64,50\n16,90\n")
    with pytest.raises(SweepDataError, match="batch size 16 appears on lines 2, 4"):
        load_sweep(path)
    # The same batch size under two goals is not a duplicate.
    ok = write(tmp_path / "ok.csv", "goal,batch_size,steps\n2,16,100\n3,16,50\n")
    assert len(load_sweep(ok)) == 2


def test_goal_option_needs_goal_column_or_curves(tmp_path: Path) -> None:
    path = write(tmp_path / "runs.csv", "batch_size,steps\n16,100\n")
    with pytest.raises(SweepDataError, match="without a `goal` column"):
        load_sweep(path, [2.0])


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        pytest.param("a.csv", "batch_size,steps\n16,100\n32,\n", "line 3: column `steps` is empty",
                     id="empty_cell"),
        pytest.param("a.csv", "batch_size,steps\n16,100\n32,50,9\n", "line 3: 3 fields but the header has 2",
                     id="ragged"),
        pytest.param("a.csv", "batch_size,steps\n-16,100\n",
                     "line 2: column `batch_size` must be a positive whole number, got -16", id="negative"),
        pytest.param("a.csv", "batch_size,steps\n16,inf\n", "line 2: column `steps` .* is not finite",
                     id="inf"),
        pytest.param("a.csv", "bs,n\n16,100\n", "expected `batch_size, steps`", id="columns"),
        pytest.param("a.csv", "", "empty", id="empty_file"),
        pytest.param("a.jsonl", '{"batch_size": 16, "steps": 10}\n{"batch_size": 32, "steps": \n',
                     "line 2: not valid JSON", id="corrupt_json"),
        pytest.param("a.jsonl", '{"batch_size": 16, "steps": 10}\n[1, 2]\n', "line 2: expected a JSON object",
                     id="not_object"),
        pytest.param("a.jsonl", '{"batch_size": 16, "steps": 10}\n{"batch_size": 32}\n',
                     "line 2: column `steps` is empty", id="missing_key"),
        pytest.param("a.jsonl", '{"batch_size": true, "steps": 10}\n', "line 1: column `batch_size`",
                     id="bool_value"),
    ],
)  # fmt: skip
def test_corrupt_files_raise_with_line_numbers(tmp_path: Path, name: str, text: str, match: str) -> None:
    with pytest.raises(SweepDataError, match=match):
        load_sweep(write(tmp_path / name, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SweepDataError, match="no such file"):
        load_sweep(tmp_path / "nope.csv")


def test_header_without_records(tmp_path: Path) -> None:
    with pytest.raises(SweepDataError, match=r"a\.csv: no records below the header"):
        load_sweep(write(tmp_path / "a.csv", "batch_size,steps\n"))


def test_binary_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"batch_size,steps\n\xff\xfe\x00\n")
    with pytest.raises(SweepDataError, match=r"a\.csv: not a UTF-8 text file \(byte 17\)"):
        load_sweep(path)


def test_directory_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(SweepDataError, match=r"is a directory: give a sweep file \(CSV or JSON Lines\)$"):
        load_sweep(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a sweep that has not finished yet
    with pytest.raises(SweepDataError, match=r"no results\.csv yet: re-run `noisescale sweep`"):
        load_sweep(tmp_path)
    write(tmp_path / "results.csv", "batch_size,steps\n16,100\n")
    with pytest.raises(SweepDataError, match=re.escape(f"e.g. {tmp_path / 'results.csv'}")):
        load_sweep(tmp_path)


@pytest.mark.parametrize("goal", [np.nan, np.inf])
def test_non_finite_goals_are_refused(tmp_path: Path, goal: float) -> None:
    path = write(tmp_path / "a.csv", "goal,batch_size,steps\n2,16,100\n")
    with pytest.raises(SweepDataError, match="goals must be finite numbers"):
        load_sweep(path, [goal])


def test_curves_give_interpolated_crossing_bracketed_by_the_logs(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "curves.jsonl", curve_records())
    df = load_sweep(path, [2.0])
    assert list(df.columns) == COLUMNS
    assert df["run"].tolist() == ["b16-lr0.3", "b64-lr0.3", "b256-lr0.3", "b1024-lr0.3"]
    # loss <= 2 when exp(-s/tau) <= 1/3: s = tau ln 3, between two logs 50 steps apart.
    tau = 1000 * (1 + 500 / np.array([16, 64, 256, 1024]))
    truth = tau * np.log(3)
    np.testing.assert_array_equal(df["steps_high"], np.ceil(truth / 50) * 50)
    np.testing.assert_array_equal(df["steps_low"], df["steps_high"] - 50)
    # The error of a chord over a bracket of relative width h = 50/s is O(h^2/8) of s:
    # h <= 0.031 here, so 1.2e-4 at most.
    np.testing.assert_allclose(df["steps"], truth, rtol=2e-4)
    assert df["reached"].all() and (df["metric"] == "loss").all()
    assert (df["lr"] == 0.3).all()
    # Run-averaged B_simple (100 / loss, step-weighted to the crossing): between 100/4 and 100/2.
    assert ((df["b_simple"] > 25) & (df["b_simple"] < 50)).all()


def test_curves_in_csv_match_jsonl(tmp_path: Path) -> None:
    rows = curve_records()
    pd.DataFrame(rows).to_csv(tmp_path / "curves.csv", index=False)
    write_jsonl(tmp_path / "curves.jsonl", rows)
    a, b = load_sweep(tmp_path / "curves.csv", [2.0, 1.5]), load_sweep(tmp_path / "curves.jsonl", [2.0, 1.5])
    pd.testing.assert_frame_equal(a, b)


def test_runs_that_never_reach_are_censored_at_their_last_step(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "curves.jsonl", curve_records())
    # loss 1.01 needs tau ln 300 = 5.7 tau: batch 16 (tau 32250) never gets there in 40000 steps.
    df = load_sweep(path, [1.01])
    row = df[df["batch_size"] == 16].iloc[0]
    assert not row["reached"] and row["steps"] == 40000
    assert row["steps_low"] == row["steps_high"] == 40000  # a censored row has no bracket
    assert np.isnan(row["b_simple"])
    assert df[df["batch_size"] >= 256]["reached"].all()


def test_censored_batch_takes_fewest_steps_run(tmp_path: Path) -> None:
    # Neither run at batch 16 reaches the goal; the best-tuned one would need more than the
    # shorter of the two, so the batch size is censored there.
    records = [{"batch_size": 16, "step": s, "loss": 3.0, "run": r} for r, n in (("a", 500), ("b", 800))
               for s in range(0, n + 1, 100)]  # fmt: skip
    df = load_sweep(write_jsonl(tmp_path / "c.jsonl", records), [1.0])
    assert df["steps"].tolist() == [500.0] and not df["reached"].iloc[0]


def test_curves_without_run_column_use_lr_or_need_run(tmp_path: Path) -> None:
    records = [{k: v for k, v in r.items() if k != "run"} for r in curve_records()]
    df = load_sweep(write_jsonl(tmp_path / "lr.jsonl", records), [2.0])
    assert df["lr"].tolist() == [0.3] * 4  # runs told apart by learning rate
    no_lr = [{k: v for k, v in r.items() if k not in ("run", "lr")} for r in curve_records()]
    with pytest.raises(SweepDataError, match="add a `run` column"):
        load_sweep(write_jsonl(tmp_path / "mixed.jsonl", no_lr), [2.0])


def test_curve_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "curves.jsonl", curve_records())
    with pytest.raises(SweepDataError, match="need at least one goal"):
        load_sweep(path)
    with pytest.raises(SweepDataError, match="meets goal 5 at step 0 \\(line 1\\)"):
        load_sweep(path, [5.0])
    two = [{"batch_size": b, "step": s, "loss": 1.0, "run": "x"} for b, s in ((16, 1), (32, 2))]
    with pytest.raises(SweepDataError, match="run 'x' has more than one batch size"):
        load_sweep(write_jsonl(tmp_path / "two.jsonl", two), [2.0])
    bad = write(tmp_path / "bad.csv", "batch_size,step,loss\n16,0,3\n16,10,oops\n")
    with pytest.raises(SweepDataError, match="line 3: column `loss` \\('oops'\\) is not a number"):
        load_sweep(bad, [2.0])


def test_diverged_nan_loss_is_not_reaching(tmp_path: Path) -> None:
    path = write(tmp_path / "nan.csv", "batch_size,step,loss\n16,0,3\n16,10,nan\n16,20,nan\n")
    df = load_sweep(path, [2.0])
    # Censored where it diverged (step 10), as the sweep, which stops there, censors it.
    assert not df["reached"].iloc[0] and df["steps"].iloc[0] == 10


def test_censored_batch_skips_diverged_runs(tmp_path: Path) -> None:
    # The one censoring rule of the sweep: a diverged run (last loss not finite) bounds nothing.
    records = [{"batch_size": 16, "step": s, "loss": 3.0 if s < 200 or r == "b" else float("nan"), "run": r}
               for r, n in (("a", 300), ("b", 800)) for s in range(0, n + 1, 100)]  # fmt: skip
    df = load_sweep(write_jsonl(tmp_path / "c.jsonl", records), [1.0])
    assert df["steps"].tolist() == [800.0] and df["run"].tolist() == ["b"]


def test_fit_sweep_per_goal_and_b_simple(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "curves.jsonl", curve_records())
    table = load_sweep(path, [2.0, 1.001])
    fits = fit_sweep(table, FitSettings(n_bootstrap=200))
    assert [g.goal for g in fits] == [2.0, 1.001]
    first, last = fits
    # The curves put tau on the hyperbola with B_crit = 500; the interpolated crossings are
    # within 2e-4 of the truth (above), so B_crit is recovered to 1e-3.
    assert first.error is None and first.fit.b_crit == pytest.approx(500, rel=1e-3)
    # loss 1.001 needs 8 tau: only batch sizes 256 and 1024 reach it in 40000 steps.
    assert last.fit is None and "reached at 2 batch size(s) (256, 1024)" in last.error
    med, lo, hi = first.b_simple
    assert lo <= med <= hi and 25 < med < 50
    assert last.b_simple is not None and last.b_simple.max < 100  # the 2 that reached


def test_empty_loss_cells_are_nan_in_csv_and_jsonl(tmp_path: Path) -> None:
    # pandas writes NaN as an empty CSV cell and as null in JSON Lines: both read as the word nan.
    rows = curve_records()
    for i in range(3, len(rows), 7):
        rows[i]["loss"] = float("nan")
    rows[-1]["loss"] = float("nan")  # the last run's curve now ends diverged
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "empty.csv", index=False)
    frame.to_csv(tmp_path / "word.csv", index=False, na_rep="nan")
    frame.to_json(tmp_path / "null.jsonl", orient="records", lines=True)
    assert ",," in (tmp_path / "empty.csv").read_text() and "null" in (tmp_path / "null.jsonl").read_text()
    want = load_sweep(tmp_path / "word.csv", [2.0, 1.5])
    pd.testing.assert_frame_equal(load_sweep(tmp_path / "empty.csv", [2.0, 1.5]), want)
    pd.testing.assert_frame_equal(load_sweep(tmp_path / "null.jsonl", [2.0, 1.5]), want)
    # A curve ending in an empty cell diverged, as one ending in nan: censored where it diverged.
    path = write(tmp_path / "div.csv", "batch_size,step,loss\n16,0,3\n16,10,2.5\n16,20,\n16,30,\n")
    df = load_sweep(path, [2.0])
    assert not df["reached"].iloc[0] and df["steps"].iloc[0] == 20


def test_diverged_curve_is_censored_where_it_diverged(tmp_path: Path) -> None:
    # As in the sweep, which stops a run at its first non-finite loss: logging NaN or inf for
    # 4000 more steps does not make the run a lower bound of 4000 steps.
    lines = [f"16,{s},{3 - s / 1000 if s <= 400 else 'inf'}" for s in range(0, 4001, 50)]
    df = load_sweep(write(tmp_path / "inf.csv", "batch_size,step,loss\n" + "\n".join(lines) + "\n"), [1.0])
    assert not df["reached"].iloc[0] and df["steps"].iloc[0] == 450


def test_run_logged_at_step_0_only_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "one.csv", "batch_size,step,loss\n8,0,4\n16,0,4\n32,0,4\n")
    with pytest.raises(SweepDataError, match=r"batch 8 logs the loss at step 0 only \(line 2\): a loss curve "
                       r"needs at least two logged points.*`batch_size, steps`"):  # fmt: skip
        load_sweep(path, [1.0])
    one = write(tmp_path / "one500.csv", "batch_size,step,loss\n8,500,3\n16,500,2\n32,500,0.5\n")
    with pytest.raises(
        SweepDataError, match=r"every run logs a single point \(batch 8 at step 500, line 2\): "
    ):
        load_sweep(one, [1.0])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("batch_size,steps\n16,100\n8.5,200\n12.25,150\n",
                     r"line 3: column `batch_size` must be a positive whole number, got 8\.5 \(lines 3, 4\)",
                     id="per_run"),
        pytest.param("batch_size,step,loss\n8.5,0,4\n8.5,10,3\n16,0,4\n16,10,2\n",
                     r"line 2: column `batch_size` must be a positive whole number, got 8\.5 \(lines 2, 3\)",
                     id="curves"),
        pytest.param("batch_size,steps\n16,100\n0,50\n",
                     r"line 3: column `batch_size` must be a positive whole number, got 0$", id="zero"),
    ],
)  # fmt: skip
def test_batch_sizes_must_be_whole_numbers(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(SweepDataError, match=match):
        load_sweep(write(tmp_path / "b.csv", text), [2.0] if "loss" in text else None)


def test_duplicate_curve_rows(tmp_path: Path) -> None:
    # The same row logged twice (logs concatenated after a restart) counts once ...
    text = "batch_size,step,loss\n16,0,3\n16,0,3\n16,10,2\n16,20,1\n16,20,1\n"
    ref = load_sweep(write(tmp_path / "once.csv", "batch_size,step,loss\n16,0,3\n16,10,2\n16,20,1\n"), [1.5])
    pd.testing.assert_frame_equal(load_sweep(write(tmp_path / "twice.csv", text), [1.5]), ref)
    # ... two different losses at one step are refused, naming the lines of that step only.
    text = "batch_size,step,loss\n16,0,3\n16,0,3.5\n16,10,2\n16,20,1\n16,20,0.5\n"
    with pytest.raises(SweepDataError, match=r"batch 16 logs step 0 more than once with different values "
                       r"\(lines 2, 3\); add a `run`"):  # fmt: skip
        load_sweep(write(tmp_path / "conflict.csv", text), [1.5])


def test_several_units_name_their_lines(tmp_path: Path) -> None:
    text = "batch_size,steps,unit\n16,100,images\n32,60,images\n64,40,tokens\n128,30,\n"
    with pytest.raises(SweepDataError, match=r"column `unit` has several values: images \(line 2\), "
                       r"tokens \(line 4\); give one unit per file"):  # fmt: skip
        load_sweep(write(tmp_path / "u.csv", text))
