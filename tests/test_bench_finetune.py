"""bench/accuracy.py --suite finetune's bookkeeping: a row is written as it ends, a rerun skips the
rows it holds (the suite resumes across sessions), and the chosen recipe per task and protocol is
chosen on mean validation accuracy, its per-seed test accuracies listed as fractions in seed order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import accuracy_finetune as suite


def _fake(monkeypatch: pytest.MonkeyPatch, calls: list[tuple]) -> None:
    def head_row(data: Path, work: Path, task: str, protocol: str, seed: int,
                 start: suite.Start = suite.Start()) -> tuple[dict, Path]:
        calls.append(("head", task, protocol, seed, start.image_size, start.head))
        directory = start.directory(work, task, protocol, seed)
        directory.mkdir(parents=True, exist_ok=True)
        return {"task": task, "protocol": protocol, "recipe": start.name,
                "split_seed": seed, "validation_accuracy": 0.80, "test_accuracy": 0.81, "seconds": 1.0}, directory

    def split_cache(data: Path, work: Path, protocol: str, seed: int, image_size: int = suite.DEFAULT_SIZE) -> Path:
        calls.append(("split", protocol, seed, image_size))
        return work / "features"

    def finetune_row(source: Path, task: str, protocol: str, recipe: suite.Recipe, seed: int) -> dict:
        calls.append((recipe.name, task, protocol, seed))
        better = recipe.name == "adamw-cosine-dihedral"
        return {"task": task, "protocol": protocol, "recipe": recipe.name, "split_seed": seed,
                "validation_accuracy": 0.9 if better else 0.7, "test_accuracy": 0.88 + seed / 1000,
                "seconds_per_epoch": 10.0, "seconds": 60.0, "test_before": 0.81, "kept_epoch": 3, "epochs_run": 6,
                "run": f"{source.name}-{recipe.name}"}

    def views_row(tuned: Path, task: str, protocol: str, views: suite.Views, seed: int) -> dict:
        calls.append((views.name, task, protocol, seed, tuned.name))
        return {"task": task, "protocol": protocol, "recipe": views.name, "split_seed": seed,
                "validation_accuracy": 0.75, "test_accuracy": 0.8, "seconds": 5.0}

    monkeypatch.setattr(suite, "head_row", head_row)
    monkeypatch.setattr(suite, "views_row", views_row)
    monkeypatch.setattr(suite, "split_cache", split_cache)
    monkeypatch.setattr(suite, "finetune_row", finetune_row)
    monkeypatch.setattr("bench.elpv.export", lambda task, work: _data(work, task))


def _data(work: Path, task: str) -> Path:
    data = work / "data" / task
    for name, count in (("functional", 7), ("defective", 3)):
        (data / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (data / name / f"{i}.png").write_bytes(b"x")
    return data


def test_rows_are_kept_as_they_end_and_a_rerun_resumes(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []
    _fake(monkeypatch, calls)
    out = tmp_path / "accuracy-finetune.json"
    suite.run(tmp_path / "work", ["binary"], [0, 1], out, protocols=["75/25"])
    starts = sorted({r.start for r in suite.RECIPES})
    assert len(calls) == 2 * (len(starts) + len(suite.RECIPES) + len(suite.VIEWS))
    state = json.loads(out.read_text())
    result = state["results"]["binary"]["75/25"]
    assert result["chosen"] == "adamw-cosine-dihedral" and result["seeds"] == [0, 1]
    assert result["test"] == [0.88, 0.881] and result["majority_baseline"] == pytest.approx(0.7)
    assert not result["complete"], "five seeds make a result complete"
    calls.clear()
    suite.run(tmp_path / "work", ["binary"], [0, 1, 2], out, protocols=["75/25"])
    assert calls == [call for start in starts for call in
                     [("head", "binary", "75/25", 2, start.image_size, start.head)]
                     + [(r.name, "binary", "75/25", 2) for r in suite.RECIPES if r.start == start]
                     + [(v.name, "binary", "75/25", 2, f"lite0-head-binary-75-25-split2-{v.of}") for v in suite.VIEWS
                        if next(r for r in suite.RECIPES if r.name == v.of).start == start]], \
        "only the new seed's rows are run, each start's head before its recipes"
    assert json.loads(out.read_text())["results"]["binary"]["75/25"]["test"] == [0.88, 0.881, 0.882]


def test_a_crash_keeps_the_rows_before_it(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []
    _fake(monkeypatch, calls)
    real = suite.finetune_row

    def crash_on_the_second(source, task, protocol, recipe, seed):  # noqa: ANN001, ANN202
        if recipe.name != "adamw-cosine-dihedral":
            raise RuntimeError("the machine went away")
        return real(source, task, protocol, recipe, seed)

    monkeypatch.setattr(suite, "finetune_row", crash_on_the_second)
    out = tmp_path / "accuracy-finetune.json"
    with pytest.raises(RuntimeError):
        suite.run(tmp_path / "work", ["binary"], [0], out, recipes=["adamw-cosine-dihedral", "sgd-top-block"],
                  protocols=["75/25"])
    recipes = {row["recipe"] for row in json.loads(out.read_text())["rows"]}
    assert recipes == {"frozen features, logistic regression", "adamw-cosine-dihedral"}


def test_the_ordinal_suite_summarises_per_head_and_resumes_without_work(tmp_path: Path) -> None:
    from bench import accuracy_ordinal as ordinal

    rows = []
    for seed in range(5):
        for head in [*ordinal.HEADS, ordinal.BINARY_HEAD]:
            row = {"protocol": "75/25", "split_seed": seed, "head": head, "validation_accuracy": 0.78,
                   "test_accuracy": 0.70 + seed / 100, "seconds": 1.0}
            if head != ordinal.BINARY_HEAD:
                row |= {"test_mae_levels": 0.4, "test_binary_read_off": 0.86}
            rows.append(row)
    state = {"rows": rows}
    results = ordinal.summary(state)
    entry = results["75/25"]["dense, ordinal loss"]
    assert entry["seeds"] == [0, 1, 2, 3, 4] and entry["test_accuracy"] == pytest.approx([0.70, 0.71, 0.72, 0.73, 0.74])
    assert entry["test_accuracy_mean"] == pytest.approx(0.72)
    assert entry["test_binary_read_off_mean"] == pytest.approx(0.86)
    assert "test_binary_read_off" not in results["75/25"][ordinal.BINARY_HEAD]
    text = ordinal.report(results, {"4class": 0.575, "binary": 0.687})
    assert "majority baselines: 4-class 57.5%, binary 68.7%" in text and "| dense, ordinal loss | 5 |" in text
    # every row of a seed held: nothing is extracted or trained again (the paths do not exist)
    ordinal.rows_for("75/25", 3, tmp_path / "missing4", tmp_path / "missing2", tmp_path, state, tmp_path / "out.json")
    assert len(state["rows"]) == len(rows) and not (tmp_path / "out.json").exists()


def test_a_recipe_measured_on_one_seed_is_not_chosen_over_one_measured_on_five() -> None:
    rows = [{"task": "binary", "protocol": "75/25", "recipe": "five", "split_seed": seed,
             "validation_accuracy": 0.85, "test_accuracy": 0.86} for seed in range(5)]
    rows.append({"task": "binary", "protocol": "75/25", "recipe": "one", "split_seed": 0,
                 "validation_accuracy": 0.95, "test_accuracy": 0.80})
    chosen = suite.summary({"rows": rows}, ["binary"], {"binary": 0.687})["binary"]["75/25"]
    assert chosen["chosen"] == "five" and chosen["complete"] and len(chosen["test"]) == 5
    assert chosen["recipes"]["one"]["validation_mean"] == 0.95  # still listed beside it


def test_a_held_head_is_re_split_before_a_new_recipe_fine_tunes_it(tmp_path: Path, monkeypatch) -> None:
    """The seeds and protocols share one cache: a head run whose row is held gets its own splits
    back (a re-split, no backbone pass) before another recipe fine-tunes it; a seed with nothing
    left to run re-splits nothing."""
    calls: list[tuple] = []
    _fake(monkeypatch, calls)
    out = tmp_path / "accuracy-finetune.json"
    suite.run(tmp_path / "work", ["binary"], [0, 1], out, recipes=["sgd-top-block"], protocols=["75/25"])
    calls.clear()
    suite.run(tmp_path / "work", ["binary"], [0, 1], out, recipes=["sgd-top-block", "sgd-top-block-12"],
              protocols=["75/25"])
    assert calls == [("split", "75/25", 0, 224), ("sgd-top-block-12", "binary", "75/25", 0),
                     ("split", "75/25", 1, 224), ("sgd-top-block-12", "binary", "75/25", 1)]
    calls.clear()
    suite.run(tmp_path / "work", ["binary"], [0, 1], out, recipes=["sgd-top-block", "sgd-top-block-12"],
              protocols=["75/25"])
    assert calls == []


def test_each_start_has_its_own_head_and_baseline_row(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []
    _fake(monkeypatch, calls)
    out = tmp_path / "accuracy-finetune.json"
    suite.run(tmp_path / "work", ["binary"], [0], out,
              recipes=["sgd-top-block", "sgd-top-block-300px", "sgd-top-block-from-dense"], protocols=["75/25"])
    assert calls == [("head", "binary", "75/25", 0, 224, "dense"), ("sgd-top-block-from-dense", "binary", "75/25", 0),
                     ("head", "binary", "75/25", 0, 224, "logreg"), ("sgd-top-block", "binary", "75/25", 0),
                     ("head", "binary", "75/25", 0, 300, "logreg"), ("sgd-top-block-300px", "binary", "75/25", 0)]
    recipes = json.loads(out.read_text())["results"]["binary"]["75/25"]["recipes"]
    assert set(recipes) == {"frozen features, logistic regression", "frozen features, logistic regression, 300 px",
                            "frozen features, dense head", "sgd-top-block", "sgd-top-block-300px",
                            "sgd-top-block-from-dense"}
    assert suite.BASELINE == "frozen features, logistic regression"  # the rows already measured keep their name
    assert suite.Start(300).directory(tmp_path, "binary", "75/25", 0).name == "lite0-head-binary-75-25-split0-300px"
    assert suite.Start(head="dense").directory(tmp_path, "4class", "70/15/15", 3).name == \
        "lite0-head-4class-70-15-15-split3-dense"


def test_views_rescore_a_recipes_runs_after_it_and_only_where_it_ran(tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple] = []
    _fake(monkeypatch, calls)
    out = tmp_path / "accuracy-finetune.json"
    views = suite.Views("sgd-top-block", "flip")
    assert views.name == "sgd-top-block, flip views at test" and views in suite.VIEWS
    suite.run(tmp_path / "work", ["binary"], [0], out, recipes=[views.name], protocols=["75/25"])
    assert calls == [("head", "binary", "75/25", 0, 224, "logreg")], "no run of the recipe: nothing to score"
    calls.clear()
    suite.run(tmp_path / "work", ["binary"], [0], out, recipes=["sgd-top-block", views.name], protocols=["75/25"])
    assert calls == [("split", "75/25", 0, 224), ("sgd-top-block", "binary", "75/25", 0),
                     (views.name, "binary", "75/25", 0, "lite0-head-binary-75-25-split0-sgd-top-block")]
    calls.clear()
    suite.run(tmp_path / "work", ["binary"], [0], out, recipes=["sgd-top-block", views.name], protocols=["75/25"])
    assert calls == []
    recipes = json.loads(out.read_text())["results"]["binary"]["75/25"]["recipes"]
    assert recipes[views.name]["test"] == [0.8]
