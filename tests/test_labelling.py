"""Labels as data (pipeline/labelling): a labels table joined to a cache by path or content id,
relabelling and re-splitting without the backbone, soft targets, and the one-line refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import pipeline
from conftest import FAST_LOGREG, clustered_features, write_feature_cache
from pipeline.cache.store import FeatureStore
from pipeline.errors import PipelineError
from pipeline.labelling import LabelSpec, labelling_from_table


def _table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> FeatureStore:
    """Three clustered classes a, b, c of pooled vectors, 150 images in the cache's own splits."""
    features, labels, splits = clustered_features(150, 3, seed=1, shape=(16,), separation=4.0)
    return FeatureStore(write_feature_cache(tmp_path / "features" / "synthetic", features, labels, splits,
                                            ["a", "b", "c"], pooling="avg"))


def _rows(store: FeatureStore) -> tuple[list[str], list[str], np.ndarray]:
    rows = store.rows_index()
    return rows.paths, rows.sha256, rows.labels


def test_a_table_without_splits_relabels_every_image_and_keeps_the_caches_splits(cache: FeatureStore,
                                                                                   tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    names = ["x" if label == 0 else "y" for label in labels]  # b and c merged into y
    table = _table(tmp_path / "labels.csv", ["path", "label"], [[p, n] for p, n in zip(paths, names)])
    relabelled = labelling_from_table(cache, LabelSpec(table)).apply()
    assert relabelled.class_names == ["x", "y"]
    for split, index in relabelled.split_indexes().items():
        assert index.paths == cache.split_indexes()[split].paths  # the same images in the same splits
        assert [relabelled.class_names[k] for k in index.labels] == \
            ["x" if cache.class_names[k] == "a" else "y" for k in cache.split_indexes()[split].labels]


def test_a_partial_table_relabels_only_what_it_names_and_an_empty_label_unlabels(cache: FeatureStore,
                                                                                 tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    table = _table(tmp_path / "fixes.csv", ["path", "label"], [[paths[0], "c"], [paths[1], ""]])
    labelling = labelling_from_table(cache, LabelSpec(table))
    assert labelling.labels[0] == 2 and labelling.labels[1] == -1
    assert np.array_equal(labelling.labels[2:], labels[2:])
    assert labelling.counts["unlabelled"] == 1 and labelling.counts["from_table"] == 2
    assert labelling.counts["from_cache"] == 148


def test_rows_are_found_by_content_id_where_the_path_names_nothing(cache: FeatureStore, tmp_path: Path) -> None:
    paths, ids, _ = _rows(cache)
    table = _table(tmp_path / "by_id.csv", ["path", "id", "label"], [["renamed/elsewhere.png", ids[3], "b"]])
    labelling = labelling_from_table(cache, LabelSpec(table))
    assert labelling.class_names[labelling.labels[3]] == "b"


def test_a_split_column_moves_images_and_a_group_is_never_split(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    names = [cache.class_names[k] for k in labels]
    moved = ["test" if i < 10 else "" for i in range(len(paths))]
    table = _table(tmp_path / "moved.csv", ["path", "label", "split"], [[p, n, s] for p, n, s in zip(paths, names,
                                                                                                     moved)])
    labelling = labelling_from_table(cache, LabelSpec(table, split="split"))
    assert labelling.splits[:10] == ["test"] * 10
    grouped = _table(tmp_path / "grouped.csv", ["path", "label", "module"],
                     [[p, n, f"m{i // 5}"] for i, (p, n) in enumerate(zip(paths, names))])
    labelling = labelling_from_table(cache, LabelSpec(grouped, group="module"), over_default=False)
    by_group: dict[str, set[str]] = {}
    for i, split in enumerate(labelling.splits):
        by_group.setdefault(f"m{i // 5}", set()).add(split)
    assert all(len(splits) == 1 for splits in by_group.values())
    assert {s for splits in by_group.values() for s in splits} == {"train", "validation", "test"}


def test_the_stable_split_follows_the_content_id_not_the_name(tmp_path: Path) -> None:
    """Two caches of the same images under other names: a table without splits gives each image
    the same split in both (the rule reads the content id)."""
    features, labels, splits = clustered_features(90, 3, seed=2, shape=(8,))
    first = FeatureStore(write_feature_cache(tmp_path / "one" / "c", features, labels, splits, ["a", "b", "c"],
                                             pooling="avg"))
    second = FeatureStore(write_feature_cache(tmp_path / "two" / "c", features, labels, splits, ["p", "q", "r"],
                                              pooling="avg"))
    results = []
    for store, where in ((first, "one"), (second, "two")):
        paths, _, labels_ = _rows(store)
        table = _table(tmp_path / where / "t.csv", ["path", "label"],
                       [[p, "k" + str(k)] for p, k in zip(paths, labels_)])
        labelling = labelling_from_table(store, LabelSpec(table), over_default=False)
        results.append(dict(zip(store.rows_index().sha256, labelling.splits)))
    assert results[0] == results[1]
    assert set(results[0].values()) == {"train", "validation", "test"}


@pytest.mark.parametrize(("header", "rows", "spec", "message"), [
    (["file", "label"], [["x", "a"]], {}, "has no column 'path' (its columns: file, label)"),
    (["path", "kind"], [["x", "a"]], {}, "has no column 'label' (its columns: path, kind)"),
    (["path", "label"], [["a/img00000.png", "a"], ["nowhere/1.png", "b"], ["nowhere/2.png", "b"]], {},
     "2 row(s) of"),
    (["path", "label"], [["a/img00000.png", "a"], ["a/img00000.png", "b"]], {},
     "two labels ('a' on row 2, 'b' on row 3)"),
    (["path", "p"], [["a/img00000.png", ""]], {"target": "p"}, "is empty: every row's label is missing"),
    (["path", "p"], [["a/img00000.png", "1.5"]], {"target": "p"}, "'1.5' in column 'p' is outside [0, 1]"),
    (["path", "p"], [["a/img00000.png", "nan"]], {"target": "p"}, "is outside [0, 1]"),
    (["path", "p"], [["a/img00000.png", "high"]], {"target": "p"}, "is not a number"),
    (["path", "label", "s"], [["a/img00000.png", "a", "holdout"]], {"split": "s"}, "split 'holdout' in column 's'"),
])
def test_bad_tables_are_one_line(cache: FeatureStore, tmp_path: Path, header: list[str], rows: list[list[object]],
                                 spec: dict, message: str) -> None:
    # the cache's first image is a/img00000.png? take its real path instead
    first = cache.rows_index().paths[0]
    rows = [[first if cell == "a/img00000.png" else cell for cell in row] for row in rows]
    table = _table(tmp_path / "bad.csv", header, rows)
    with pytest.raises(PipelineError, match=None) as caught:
        labelling_from_table(cache, LabelSpec(table, **spec))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_missing_skip_goes_on_and_says_how_many(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    table = _table(tmp_path / "t.csv", ["path", "label"],
                   [[p, cache.class_names[k]] for p, k in zip(paths, labels)] + [["gone/1.png", "a"]])
    labelling = labelling_from_table(cache, LabelSpec(table, missing="skip"))
    assert labelling.counts["missing_skipped"] == 1 and "gone/1.png" in labelling.notes[0]


def test_a_group_across_given_splits_and_a_split_left_empty_are_refused(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    rows = [[p, cache.class_names[k], "g", "train" if i else "test"] for i, (p, k) in enumerate(zip(paths, labels))]
    table = _table(tmp_path / "t.csv", ["path", "label", "g", "split"], rows)
    with pytest.raises(PipelineError, match="group 'g' .* has images in"):
        labelling_from_table(cache, LabelSpec(table, group="g", split="split"))
    one_group = _table(tmp_path / "one.csv", ["path", "label", "g"],
                       [[p, cache.class_names[k], "all"] for p, k in zip(paths, labels)])
    with pytest.raises(PipelineError, match="split is empty"):
        labelling_from_table(cache, LabelSpec(one_group, group="g"), over_default=False)


def test_tables_that_are_not_utf8_or_hold_quoted_line_breaks(cache: FeatureStore, tmp_path: Path) -> None:
    first = cache.rows_index().paths[0]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"path,label\n{first},caf\xe9\n".encode("latin-1"))
    with pytest.raises(PipelineError, match="is not UTF-8 text"):
        labelling_from_table(cache, LabelSpec(latin))
    quoted = tmp_path / "quoted.csv"
    quoted.write_text(f'path,note,label\n{first},"two\nlines, and ""quotes""",c\n', encoding="utf-8")
    labelling = labelling_from_table(cache, LabelSpec(quoted))
    assert labelling.class_names[labelling.labels[0]] == "c"
    broken = tmp_path / "broken.csv"
    broken.write_text(f'path,label\n{first},"never closed\n', encoding="utf-8")
    with pytest.raises(PipelineError):
        labelling_from_table(cache, LabelSpec(broken))


def test_dataframes_and_parquet_are_tables_too(cache: FeatureStore, tmp_path: Path) -> None:
    pandas = pytest.importorskip("pandas")
    paths, _, labels = _rows(cache)
    frame = pandas.DataFrame({"path": paths, "kind": [int(k) for k in labels]})
    labelling = labelling_from_table(cache, LabelSpec(frame, label="kind"))
    assert labelling.class_names == ["0", "1", "2"]  # whole numbers as their digits
    frame.to_parquet(tmp_path / "t.parquet")
    assert labelling_from_table(cache, LabelSpec(tmp_path / "t.parquet", label="kind")).digest() == labelling.digest()


def test_train_head_on_a_table_records_its_labelling_and_evaluate_reads_it_back(cache: FeatureStore,
                                                                                 tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    names = ["x" if k == 0 else "y" for k in labels]
    table = _table(tmp_path / "labels.csv", ["path", "label"], [[p, n] for p, n in zip(paths, names)])
    run = pipeline.train_head(cache, labels=table, models=tmp_path / "models", progress=False, **FAST_LOGREG)
    assert run.class_names == ["x", "y"]
    assert (run.directory / "labelling.csv").is_file()
    recorded = run.config["labelling"]
    assert recorded["classes"] == ["x", "y"] and len(recorded["digest"]) == 64
    before = run.metrics["test"]
    again = pipeline.evaluate(run)
    assert again.metrics["test"]["accuracy"] == before["accuracy"]
    folder_run = pipeline.train_head(cache, models=tmp_path / "models", progress=False, **FAST_LOGREG)
    assert folder_run.name != run.name  # two labellings, two runs side by side
    # a labelling.csv edited after training is not the run's: refused, not read
    text = (run.directory / "labelling.csv").read_text()
    (run.directory / "labelling.csv").write_text(text.replace(",x\n", ",y\n", 1))
    with pytest.raises(PipelineError, match="does not hold the labels the run was trained on"):
        pipeline.evaluate(run)


def test_soft_targets_train_logreg_and_dense_and_are_scored_against_the_targets(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(160, 2, seed=3, shape=(12,), separation=3.0)
    store = FeatureStore(write_feature_cache(tmp_path / "features" / "soft", features, labels, splits, ["n", "p"],
                                             pooling="avg"))
    rng = np.random.default_rng(0)
    probability = np.clip(labels * 0.8 + 0.1 + rng.normal(0, 0.05, len(labels)), 0, 1)
    table = _table(tmp_path / "soft.csv", ["path", "defect_probability"],
                   [[p, f"{q:.3f}"] for p, q in zip(store.rows_index().paths, probability)])
    run = pipeline.train_head(store, labels=table, target="defect_probability", models=tmp_path / "models",
                              progress=False, **FAST_LOGREG)
    assert run.class_names == ["0", "1"]
    soft = run.metrics["test"]["soft"]
    assert soft["mean_absolute_error"] < 0.15 and 0 <= soft["brier"] < 0.1
    assert run.metrics["test"]["accuracy"] > 0.9
    dense = pipeline.train_head(store, labels=table, target="defect_probability", head="dense", epochs=5,
                                models=tmp_path / "models", progress=False)
    assert "soft" in dense.metrics["validation"]
    with pytest.raises(PipelineError, match="trains on classes, not on soft targets"):
        pipeline.train_head(store, labels=table, target="defect_probability", head="knn",
                            models=tmp_path / "models", progress=False)
    auto = pipeline.train_head(store, labels=table, target="defect_probability", head="auto", epochs=3,
                               models=tmp_path / "models", progress=False, **FAST_LOGREG)
    assert [row["head"] for row in auto.comparison.rows] == ["logreg", "dense"]  # the heads soft targets train


def test_label_flags_without_a_table_and_both_label_and_target_are_refused(cache: FeatureStore) -> None:
    with pytest.raises(PipelineError, match="reads a labels table: add --labels TABLE"):
        LabelSpec(None, label="kind")
    with pytest.raises(PipelineError, match="give one"):
        LabelSpec("t.csv", label="a", target="b")


def test_an_audits_suspects_table_accepts_its_suggestions(cache: FeatureStore, tmp_path: Path) -> None:
    paths, ids, labels = _rows(cache)
    suspects = _table(tmp_path / "suspects.csv", ["path", "split", "label", "suggested", "score", "id"],
                      [[paths[5], "train", cache.class_names[labels[5]], "c" if labels[5] != 2 else "a", "0.01",
                        ids[5]]])
    labelling = labelling_from_table(cache, LabelSpec(suspects, label="suggested"))
    assert labelling.labels[5] != labels[5]
    assert np.array_equal(np.delete(labelling.labels, 5), np.delete(labels, 5))
    assert json.dumps(labelling.record())  # what config.json keeps is JSON


def test_embeddings_write_every_image_with_the_labelling_s_class(cache: FeatureStore, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    paths, _, labels = _rows(cache)
    table = _table(tmp_path / "t.csv", ["path", "label"], [[paths[0], "c"], [paths[1], ""]])
    written = pipeline.embeddings(cache, tmp_path / "e.parquet", labels=table, progress=False)
    assert written.rows == len(paths)
    frame = pq.read_table(written.path).to_pandas().set_index("path")
    assert frame.loc[paths[0], "class"] == "c"
    assert frame.loc[paths[1], "class"] == "" and frame.loc[paths[1], "label"] == -1
    assert frame.loc[paths[1], "split"] == ""
    assert frame.loc[paths[2], "class"] == cache.class_names[labels[2]]


def test_a_binary_threshold_chosen_on_validation_is_recorded_and_decides(tmp_path: Path) -> None:
    features, labels, splits = clustered_features(200, 2, seed=4, shape=(6,), separation=1.0)
    store = FeatureStore(write_feature_cache(tmp_path / "features" / "b", features, labels, splits, ["neg", "pos"],
                                             pooling="avg"))
    run = pipeline.train_head(store, threshold="validation", models=tmp_path / "models", progress=False,
                              **FAST_LOGREG)
    threshold = run.threshold
    assert threshold is not None and 0 < threshold < 1 and run.config["head"]["threshold_rule"] == "validation"
    from pipeline.cache.reader import load_splits

    splits_ = load_splits(run.features(), run.view)
    head = run.head()
    for split in ("validation", "test"):
        p = head.predict_proba(splits_[split])[:, 1]
        expected = float(np.mean((p >= threshold).astype(int) == splits_[split].labels))
        assert run.metrics[split]["accuracy"] == pytest.approx(expected)
    fixed = pipeline.train_head(store, threshold=0.9, models=tmp_path / "models", name="fixed", progress=False,
                                **FAST_LOGREG)
    assert fixed.threshold == 0.9
    with pytest.raises(PipelineError, match="--threshold 2"):
        pipeline.train_head(store, threshold=2, models=tmp_path / "models", progress=False)
    three = FeatureStore(write_feature_cache(tmp_path / "features" / "c", *clustered_features(60, 3),
                                             ["a", "b", "c"]))
    with pytest.raises(PipelineError, match="applies to a task of two classes"):
        pipeline.train_head(three, threshold="validation", models=tmp_path / "models", progress=False)


def test_metrics_by_a_column_give_each_value_its_figures(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    table = _table(tmp_path / "t.csv", ["path", "label", "kind"],
                   [[p, cache.class_names[k], "mono" if i % 3 else "poly"] for i, (p, k) in
                    enumerate(zip(paths, labels))])
    run = pipeline.train_head(cache, labels=table, metrics_by="kind", models=tmp_path / "models", progress=False,
                              **FAST_LOGREG)
    by = run.metrics["test"]["by_group"]
    assert set(by) == {"mono", "poly"}
    assert by["mono"]["images"] + by["poly"]["images"] == run.metrics["test"]["images"]
    again = pipeline.evaluate(run)
    assert again.metrics["test"]["by_group"] == by


def test_evaluate_scores_a_run_against_corrected_labels(cache: FeatureStore, tmp_path: Path) -> None:
    run = pipeline.train_head(cache, models=tmp_path / "models", progress=False, **FAST_LOGREG)
    test = cache.split_indexes()["test"]
    wrong = [[p, cache.class_names[(k + 1) % 3]] for p, k in zip(test.paths[:5], test.labels[:5])]
    table = _table(tmp_path / "fixes.csv", ["path", "label"], wrong)
    before = run.metrics["test"]["accuracy"]
    again = pipeline.evaluate(run, labels=table)
    assert again.metrics["test"]["accuracy"] == pytest.approx(before - 5 / len(test.paths))  # it was right on all
    moved = _table(tmp_path / "moved.csv", ["path", "label", "split"],
                   [[p, cache.class_names[k], "test"] for p, k in zip(cache.split_indexes()["train"].paths[:2],
                                                                      cache.split_indexes()["train"].labels[:2])])
    with pytest.raises(PipelineError, match="assigns 2 images to other splits"):
        pipeline.evaluate(run, labels=moved, split_column="split")


def test_soft_targets_over_several_classes_from_probability_columns(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    rows = [[p, *[0.8 if k == j else 0.1 for j in range(3)]] for p, k in zip(paths, labels)]
    table = _table(tmp_path / "soft3.csv", ["path", "a", "b", "c"], rows)
    run = pipeline.train_head(cache, labels=table, target_columns="a,b,c", models=tmp_path / "models",
                              progress=False, **FAST_LOGREG)
    assert run.class_names == ["a", "b", "c"] and run.task == "soft"
    assert run.metrics["test"]["accuracy"] > 0.9 and "brier" in run.metrics["test"]["soft"]
    assert pipeline.evaluate(run).metrics["test"]["soft"] == run.metrics["test"]["soft"]
    bad = _table(tmp_path / "bad.csv", ["path", "a", "b", "c"], [[paths[0], 0.5, 0.4, 0.3]])
    with pytest.raises(PipelineError, match="sum to 1.2, not 1"):
        labelling_from_table(cache, LabelSpec(bad, target_columns=("a", "b", "c")))


def test_the_command_line_takes_every_labels_flag(cache: FeatureStore, tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    paths, _, labels = _rows(cache)
    table = _table(tmp_path / "t.csv", ["file", "kind", "tags", "p", "part", "batch", "cell"],
                   [[p, cache.class_names[k], f"{cache.class_names[k]};{'odd' if i % 2 else 'even'}",
                     "0.9" if k == 0 else "0.1", "", f"b{i // 10}", "mono" if i % 2 else "poly"]
                    for i, (p, k) in enumerate(zip(paths, labels))])
    common = ["train-head", "--features", str(cache.directory), "--models", str(tmp_path / "models"), "--labels",
              str(table), "--path-column", "file", "--c-grid", "1e-2:1e1:4", "--no-progress", "--json"]
    assert main([*common, "--label-column", "kind", "--group-column", "batch", "--metrics-by", "cell"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert set(run["metrics"]["test"]["by_group"]) <= {"mono", "poly"}
    assert main([*common, "--target-column", "p", "--threshold", "validation"]) == 0
    run = json.loads(capsys.readouterr().out)
    config = json.loads((Path(run["run"]) / "config.json").read_text())
    assert "soft" in run["metrics"]["test"] and config["head"]["threshold_rule"] == "validation"
    assert main([*common, "--label-column", "tags", "--label-separator", ";"]) == 0
    run = json.loads(capsys.readouterr().out)
    config = json.loads((Path(run["run"]) / "config.json").read_text())
    assert config["labelling"]["task"] == "multilabel" and "macro_f1" in run["metrics"]["test"]
    assert main([*common, "--label-column", "kind", "--split-column", "part", "--missing", "skip"]) == 0
    capsys.readouterr()
    assert main([*common, "--label-column", "nothing"]) == 1
    assert "has no column 'nothing'" in capsys.readouterr().err


def test_several_tables_relabel_in_order(cache: FeatureStore, tmp_path: Path) -> None:
    paths, _, labels = _rows(cache)
    first = _table(tmp_path / "first.csv", ["path", "label"], [[p, "x"] for p in paths[:60]] +
                   [[p, "y"] for p in paths[60:]])
    second = _table(tmp_path / "second.csv", ["path", "label"], [[paths[0], "y"]])
    labelling = labelling_from_table(cache, LabelSpec([first, second]), over_default=False)
    assert labelling.class_names[labelling.labels[0]] == "y" and labelling.class_names[labelling.labels[1]] == "x"
    run = pipeline.train_head(cache, labels=[first, second], models=tmp_path / "models", progress=False,
                              **FAST_LOGREG)
    assert run.config["labelling"]["source"]["table"] == [str(first.resolve()), str(second.resolve())]
