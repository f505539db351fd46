"""End-to-end tests of ``noisescale fit`` and ``noisescale predict`` on users' sweep files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from noisescale.cli.fit import fit
from noisescale.cli.predict import predict
from noisescale.critical.predict import fit_b_crit_power_law

app = typer.Typer()
app.command()(fit)
app.command()(predict)
runner = CliRunner()

S_MIN, B_CRIT = 1000.0, 500.0
BATCHES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def per_run_csv(path: Path, noise: float = 0.0, b_crit: float = B_CRIT) -> Path:
    rng = np.random.default_rng(0)
    lines = ["batch_size,steps"]
    for b in BATCHES:
        lines.append(f"{b},{S_MIN * (1 + b_crit / b) * np.exp(rng.normal(0, noise)):.6f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def steps_appendix_d(batch: float | np.ndarray, loss: float | np.ndarray) -> float | np.ndarray:
    """Steps from loss 4 down to `loss` under dL/ds = -ΔL_max/(1 + B_noise/B) (eq. 2.7).

    With ΔL_max = 1e-4 L^2 and B_noise = 1600/L^2 (rising 16x over the run) the integral is
    S = S_min(L) + E_min(L)/B, S_min = 1e4 (1/L - 1/4), E_min = (1.6e7/3)(1/L^3 - 1/64)
    (McCandlish et al. 2018, appendix D), so B_crit(L) = E_min/S_min grows as the loss falls.
    """
    return 1e4 * (1 / loss - 0.25) + (1.6e7 / batch) * (1 / (3 * loss**3) - 1 / 192)


def b_crit_appendix_d(loss: float) -> float:
    return (1600 / 3) * (loss**-3 - 1 / 64) / (1 / loss - 0.25)


def curves_jsonl(path: Path) -> Path:
    """Loss logged every 10 steps down to 1.15 at batch sizes 16..4096 (one run each)."""
    grid = np.linspace(1.15, 4.0, 20001)
    with path.open("w") as f:
        for b in (16, 64, 256, 1024, 4096):
            steps = np.arange(0, steps_appendix_d(b, 1.15) + 10, 10)
            loss = np.interp(steps, steps_appendix_d(b, grid)[::-1], grid[::-1])
            f.writelines(
                json.dumps({"batch_size": b, "step": int(s), "loss": round(float(x), 7)}) + "\n"
                for s, x in zip(steps, loss, strict=True)
            )
    return path


def invoke(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_fit_table_and_plots(tmp_path: Path) -> None:
    path = per_run_csv(tmp_path / "sweep.csv", noise=0.05)
    res = invoke("fit", path, "--bootstrap", "300")
    assert res.exit_code == 0, res.output
    assert "critical batch size" in res.output and "B_crit" in res.output
    assert (tmp_path / "sweep.pareto.png").stat().st_size > 1000
    assert (tmp_path / "sweep.b_crit.png").stat().st_size > 1000


def test_fit_json_golden_noise_free(tmp_path: Path) -> None:
    path = per_run_csv(tmp_path / "sweep.csv")
    res = invoke("fit", path, "--json", "--no-plots", "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["unit"] == "examples" and report["power_law"] is None
    (out,) = report["goals"]  # one schema: a list of goals, even for one
    for key in ("b_crit", "b_crit_ci", "s_min", "e_min", "n_points", "bracketed"):
        assert key in out
    # Steps written with 6 decimals (relative rounding <= 1e-9): the fit is exact to ~1e-7.
    assert out["b_crit"] == pytest.approx(B_CRIT, rel=1e-6)
    assert out["s_min"] == pytest.approx(S_MIN, rel=1e-6)
    assert out["e_min"] == pytest.approx(S_MIN * B_CRIT, rel=1e-6)
    assert out["n_points"] == 10 and out["bracketed"] is True and out["bound"] is None
    assert out["metric"] == "loss" and out["goal"] is None


def test_fit_unbracketed_json_has_bound_not_value(tmp_path: Path) -> None:
    path = per_run_csv(tmp_path / "sweep.csv", noise=0.05, b_crit=1e6)
    res = invoke("fit", path, "--json", "--no-plots", "--bootstrap", "300")
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.stdout)["goals"]
    assert out["b_crit"] is None and out["bracketed"] is False
    assert out["bound"] == "B_crit > 8192"
    assert out["b_crit_ci"] == [8192, None]
    text = invoke("fit", path, "--no-plots", "--bootstrap", "300").output
    assert "does not bracket B_crit: B_crit > 8192" in text and "add larger batch sizes" in text


def test_fit_loss_curves_several_goals(tmp_path: Path) -> None:
    path = curves_jsonl(tmp_path / "curves.jsonl")
    goals = [3.0, 2.0, 1.5, 1.2]
    args = [x for g in goals for x in ("--goal", str(g))]
    res = invoke("fit", path, *args, "--json", "--out", tmp_path / "plots", "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [g["goal"] for g in out["goals"]] == goals
    for g in out["goals"]:
        # Logging every 10 steps brackets each crossing within 10 steps (1.2% of the fewest,
        # 861); interpolation leaves far less, and 3% leaves room for the curves' own shape.
        assert g["b_crit"] == pytest.approx(b_crit_appendix_d(g["goal"]), rel=0.03)
        assert g["bracketed"] and g["n_censored"] == 0
    # B_crit(L) from 137 (L = 3) to 515 (L = 1.2); the exact values give alpha_B = 0.694.
    exact = fit_b_crit_power_law(goals, [b_crit_appendix_d(x) for x in goals])
    assert out["power_law"]["alpha_b"] == pytest.approx(exact.alpha_b, rel=0.05)
    assert out["power_law"]["metric"] == "loss" and out["power_law"]["goals"] == goals
    assert "plots" not in out  # the same JSON as a sweep's fit.json; the paths go to stderr
    assert "curves.b_crit" in res.stderr.replace("\n", "")
    assert (tmp_path / "plots" / "curves.pareto.png").stat().st_size > 1000


def test_fit_partial_goal_failure_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    rows = [f"2,{b},{S_MIN * (1 + B_CRIT / b)}" for b in BATCHES] + ["1,1024,9000", "1,4096,4000"]
    path.write_text("goal,batch_size,steps\n" + "\n".join(rows) + "\n")
    res = invoke("fit", path, "--no-plots", "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    assert "loss 1: the goal was reached at 2 batch size(s) (1024, 4096)" in res.output
    out = json.loads(invoke("fit", path, "--no-plots", "--bootstrap", "200", "--json").stdout)
    assert out["goals"][0]["b_crit"] == pytest.approx(B_CRIT, rel=1e-6)
    assert "at least 3" in out["goals"][1]["error"]


@pytest.mark.parametrize(
    ("text", "args", "match"),
    [
        pytest.param("batch_size,steps\n16,100\n32,abc\n", [], "line 3: column `steps`", id="corrupt"),
        pytest.param("batch_size,steps\n16,100\n64,50\n", [], "at least 3", id="too_few"),
        pytest.param("batch_size,step,loss\n16,1,3\n", [], "--goal", id="curves_without_goal"),
        pytest.param("batch_size,steps\n16,100\n64,50\n64,40\n256,30\n", [], "appears on lines 3, 4",
                     id="duplicate"),
        pytest.param("", [], "bad.csv: the file is empty", id="empty"),
        pytest.param("batch_size,steps\n", [], "bad.csv: no records below the header", id="header_only"),
        pytest.param("bs,n\n16,100\n", [], "bad.csv: columns bs, n; expected `batch_size, steps`",
                     id="missing_columns"),
        pytest.param("batch_size,steps\n16,100\n32,nan\n64,40\n", [],
                     "line 3: column `steps` ('nan') is not finite", id="nan"),
        pytest.param("batch_size,steps\n16,100\n[x],50\n", [], "column `batch_size` ('[x]') is not a number",
                     id="brackets_are_not_markup"),
        pytest.param("goal,batch_size,steps\n2,16,100\n", ["--goal", "nan"], "goals must be finite",
                     id="goal_nan"),
        pytest.param("batch_size,step,loss\n8,0,4\n16,0,4\n32,0,4\n", ["--goal", "1"],
                     "batch 8 logs the loss at step 0 only (line 2): a loss curve needs at least two",
                     id="step_0_only"),
        pytest.param("batch_size,step,loss\n8,500,3\n16,500,2\n", ["--goal", "1"],
                     "every run logs a single point (batch 8 at step 500, line 2)", id="single_points"),
        pytest.param("batch_size,steps\n16,100\n24.5,80\n64,40\n", [],
                     "line 3: column `batch_size` must be a positive whole number, got 24.5",
                     id="fractional_batch"),
        pytest.param("batch_size,steps\n0,100\n16,80\n", [],
                     "line 2: column `batch_size` must be a positive whole number, got 0", id="zero_batch"),
        pytest.param("batch_size,step,loss\n16,-10,4\n16,10,1\n", ["--goal", "2"],
                     "line 2: column `step` is negative (-10)", id="negative_step"),
        pytest.param("batch_size,step,loss\n16,0,4\n16,10,1\n16,10,2\n", ["--goal", "2"],
                     "batch 16 logs step 10 more than once with different values (lines 3, 4)",
                     id="dup_step"),
        pytest.param("batch_size,steps,unit\n16,100,images\n64,40,tokens\n", [],
                     "column `unit` has several values: images (line 2), tokens (line 3)", id="two_units"),
        pytest.param("batch_size,step,loss\n16,0,4\n16,10,1\n64,0,4\n64,10,1\n256,0,4\n256,10,1\n",
                     ["--goal", "0.5"], "loss 0.5: the goal was reached at 0 batch size(s) (none: every run "
                     "stopped short of it)", id="goal_never_reached"),
    ],
)  # fmt: skip
def test_fit_errors_are_one_line_exit_2(tmp_path: Path, text: str, args: list[str], match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    res = invoke("fit", path, "--no-plots", *args)
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr


@pytest.mark.parametrize(
    ("args", "option"),
    [
        pytest.param(
            ["--max-increase", "-1"], "--max-increase", id="max_increase_negative"
        ),  # was IndexError
        pytest.param(["--max-increase", "0.5"], "--max-increase", id="max_increase_below_1"),
        pytest.param(["--max-increase", "nan"], "--max-increase", id="max_increase_nan"),
        pytest.param(["--bootstrap", "5"], "--bootstrap", id="bootstrap"),
        pytest.param(["--confidence", "1"], "--confidence", id="confidence"),
        pytest.param(["--seed", "-1"], "--seed", id="seed"),
    ],
)
def test_fit_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], option: str) -> None:
    res = invoke("fit", per_run_csv(tmp_path / "sweep.csv"), "--no-plots", *args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"Invalid value for '{option}'" in res.stderr


def test_fit_binary_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    res = invoke("fit", path, "--no-plots")
    assert res.exit_code == 2 and f"error: {path}: not a UTF-8 text file" in res.stderr


def test_fit_directory_with_no_results(tmp_path: Path) -> None:
    res = invoke("fit", tmp_path, "--no-plots")
    assert res.exit_code == 2
    assert f"error: {tmp_path} is a directory: give a sweep file (CSV or JSON Lines)" in res.stderr
    (tmp_path / "config.json").write_text("{}")  # a sweep directory before its first results
    res = invoke("fit", tmp_path, "--no-plots")
    assert res.exit_code == 2 and "no results.csv yet" in res.stderr and "Traceback" not in res.output


def test_fit_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("")
    res = invoke("fit", per_run_csv(tmp_path / "sweep.csv"), "--out", taken, "--bootstrap", "100")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.strip() == f"error: --out {taken} is a file, not a folder: choose another --out"


def test_predict_sentence_and_table() -> None:
    res = invoke(
        "predict", "--b-crit", "835", "--s-min", "1200", "--batch-size", "512", "--batch-size", "1024"
    )
    assert res.exit_code == 0, res.output
    assert "doubling the batch from 512 to 1024 cuts steps by 31% and costs 38% more examples" in res.output
    assert "speed-up vs 512" in res.output and "1.45x" in res.output


def test_predict_json_exchange_rate_and_tokens() -> None:
    res = invoke("predict", "--b-crit", "1e6", "--exchange-rate", "4e6", "--unit", "tokens", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    pred = out["predictions"][0]
    assert pred["optimum"]["batch_size"] == pytest.approx(2e6)  # sqrt(4e6 * 1e6)
    assert pred["rows"][0]["steps"] is None  # no S_min: relative predictions only
    assert any(s.endswith("more tokens") for s in pred["sentences"])


def test_predict_from_fit_json_and_from_sweep(tmp_path: Path) -> None:
    sweep = per_run_csv(tmp_path / "sweep.csv")
    fit_json = tmp_path / "fit.json"
    fit_json.write_text(invoke("fit", sweep, "--json", "--no-plots", "--bootstrap", "200").stdout)
    a = json.loads(invoke("predict", "--from", fit_json, "--batch-size", "1000", "--json").stdout)
    b = json.loads(invoke("predict", "--from", sweep, "--batch-size", "1000", "--json").stdout)
    for out in (a, b):
        row = out["predictions"][0]["rows"][0]
        assert row["steps"] == pytest.approx(S_MIN * 1.5, rel=1e-6)  # S(1000) with B_crit 500
        assert row["efficiency"] == pytest.approx(1 / 3, rel=1e-6)


def test_predict_power_law_from_loss(tmp_path: Path) -> None:
    res = invoke(
        "predict", "--b-star", "2e8", "--alpha-b", "0.21", "--loss", "2.5", "--unit", "tokens", "--json"
    )
    out = json.loads(res.stdout)
    assert out["b_crit_at_loss"][0]["b_crit"] == pytest.approx(2e8 / 2.5 ** (1 / 0.21))
    text = invoke("predict", "--b-star", "2e8", "--alpha-b", "0.21").output
    assert "B_crit doubles for every 14% drop" in text  # 1 - 2^-0.21 = 13.55%


def test_predict_unbracketed_goal_and_errors(tmp_path: Path) -> None:
    sweep = per_run_csv(tmp_path / "sweep.csv", noise=0.05, b_crit=1e6)
    res = invoke("predict", "--from", sweep)
    assert res.exit_code == 2 and "does not bracket B_crit (B_crit > 8192)" in res.output
    for args, match in [
        (["--from", sweep, "--b-crit", "5"], "not both"),
        (["--s-min", "5"], "--s-min needs --b-crit"),
        (["--b-crit", "500", "--loss", "2"], "--loss needs"),
        (["--b-crit", "-1"], "must be positive"),
        ([], "give --b-crit"),
    ]:
        res = invoke("predict", *args)
        assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        pytest.param("fit.json", "{\n", "line 1: not valid JSON", id="truncated_json"),
        pytest.param("fit.json", '{"goals": []}', "`goals` is []; expected a non-empty list", id="no_goals"),
        pytest.param("fit.json", '{"goals": 5}', "`goals` is 5; expected a non-empty list",
                     id="goals_not_list"),
        pytest.param("fit.json", '{"b_crit": "abc"}', "`b_crit` is 'abc'; expected a positive number",
                     id="b_crit_text"),
        pytest.param("fit.json", '{"b_crit": -5}', "`b_crit` is -5; expected a positive number",
                     id="b_crit_negative"),
        pytest.param("fit.json", '{"b_crit": 500, "s_min": true}', "`s_min` is True", id="s_min_bool"),
        pytest.param("fit.json", '{"goals": [{"goal": "a", "b_crit": 5}]}', "`goal` is 'a'", id="goal_text"),
        pytest.param("fit.json", '{"b_crit": 500, "power_law": {"x": 1}}', "`power_law` is {'x': 1}",
                     id="power_law_keys"),
        pytest.param("fit.json", '{"b_crit": 500, "power_law": {"b_star": -1, "alpha_b": 0.2}}',
                     "`power_law`", id="power_law_negative"),
        pytest.param("fit.json", '{"goals": [{"goal": 2.0, "b_crit": null, "bound": "B_crit > 8192"}]}',
                     "goal 2: the sweep does not bracket B_crit (B_crit > 8192)", id="unbracketed"),
        pytest.param("runs.csv", "batch_size,steps\n16,100\n64,50\n", "goal: the goal was reached at 2",
                     id="sweep_too_few"),
        pytest.param("runs.csv", "batch_size,steps\n", "no records below the header", id="sweep_header_only"),
    ],
)  # fmt: skip
def test_predict_from_bad_file_names_it(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    res = invoke("predict", "--from", path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and match in lines[0], res.stderr


@pytest.mark.parametrize(
    "path", [pytest.param("missing.json", id="missing"), pytest.param(".", id="directory")]
)
def test_predict_from_missing_file_or_directory(tmp_path: Path, path: str) -> None:
    res = invoke("predict", "--from", tmp_path / path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.stderr.startswith(f"error: {tmp_path / path}")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--b-crit", "500", "--batch-size", "-3"], "batch_sizes` to be positive and finite but got [-3.0]"),
        (["--b-crit", "500", "--batch-size", "0"], "got [0.0]"),
        (["--b-crit", "500", "--batch-size", "nan"], "got [nan]"),  # brackets printed, not eaten as markup
        (["--b-star", "-5", "--alpha-b", "0.2"], "--b-star must be positive"),  # no law of a negative B*
        (["--b-star", "2e8", "--alpha-b", "0"], "--alpha-b must be positive"),
        (["--b-crit", "500", "--goal", "2"], "--goal selects goals of a file"),
        (["--b-star", "2e8", "--alpha-b", "0.2", "--loss", "2", "--batch-size", "64"], "need B_crit"),
    ],
)
def test_predict_bad_values_are_one_line(args: list[str], match: str) -> None:
    res = invoke("predict", *args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], res.stderr


def test_fit_empty_loss_cells_read_as_nan(tmp_path: Path) -> None:
    # pandas writes a NaN loss (a diverged step) as an empty CSV cell: the same fit as the word nan.
    lines = ["batch_size,step,loss"]
    for b in BATCHES[:6]:
        tau = S_MIN * (1 + B_CRIT / b) / np.log(4.0)  # loss 4 -> 1 in S(B) steps
        lines += [
            f"{b},{s},{4 * np.exp(-s / tau) if (s // 100) % 7 else 'nan'}" for s in range(0, 40001, 100)
        ]
    lines[-1] = lines[-1].rsplit(",", 1)[0] + ",nan"  # the last run ends diverged
    word, empty = tmp_path / "word.csv", tmp_path / "empty.csv"
    word.write_text("\n".join(lines) + "\n")
    empty.write_text("\n".join(lines).replace(",nan", ",") + "\n")
    runs = [
        invoke("fit", p, "--goal", "1", "--no-plots", "--bootstrap", "200", "--json") for p in (word, empty)
    ]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    assert json.loads(runs[0].stdout)["goals"] == json.loads(runs[1].stdout)["goals"]
    assert json.loads(runs[1].stdout)["goals"][0]["b_crit"] == pytest.approx(B_CRIT, rel=0.05)
