"""Know your data: embeddings out of the cache (parquet and npz, loaded without the project), label
suspects and near-duplicates found by the audit on a folder with planted mislabels and planted
cross-split copies, training without the suspects, and the audit's refusals."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commandline import WITHOUT_THE_PROJECT
from conftest import make_image_folder, tiny_options
from pipeline import api
from pipeline.errors import PipelineError

PARQUET_READER = WITHOUT_THE_PROJECT + r'''
import json, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
meta = json.loads(table.schema.metadata[b"bottleneck_pipeline"])
print(json.dumps({"columns": table.column_names, "rows": table.num_rows, "meta": meta,
                  "embedding": table.column("embedding").to_pylist(), "id": table.column("id").to_pylist(),
                  "path": table.column("path").to_pylist(), "split": table.column("split").to_pylist(),
                  "class": table.column("class").to_pylist(), "label": table.column("label").to_pylist()}))
'''
NPZ_READER = WITHOUT_THE_PROJECT + r'''
import json, numpy as np
with np.load(sys.argv[1], allow_pickle=False) as data:
    print(json.dumps({name: data[name].tolist() for name in ("embeddings", "ids", "paths", "labels", "splits")}))
'''


def _isolated(script: str, *args: str, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-I", "-c", script, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _image(kind: str, seed: int, size: int = 64) -> Image.Image:
    """Two looks a pretrained network tells apart at once: warm blobs, cool stripes."""
    rng = np.random.default_rng(seed)
    if kind == "warm":
        pixels = np.zeros((size, size, 3)) + [190, 70, 40]
        for _ in range(4):
            y, x, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(6, 16))]
            yy, xx = np.ogrid[:size, :size]
            pixels[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = [250, 220, 60]
    else:
        pixels = np.zeros((size, size, 3)) + [40, 80, 190]
        period = int(rng.integers(5, 10))
        pixels[(np.arange(size) // period % 2 == 0)] = [200, 230, 250]
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


PLANTED_MISLABELS = ["train/cool/warm-planted-0.png", "train/cool/warm-planted-1.png",
                     "train/warm/cool-planted-0.png"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """train/validation/test of two looks; three images of one look filed under the other (in
    train); three train images copied into test re-encoded as JPEG under other names."""
    root = tmp_path_factory.mktemp("audit")
    data = root / "data"
    seed = 0
    for split, count in (("train", 60), ("validation", 8), ("test", 8)):
        for kind in ("warm", "cool"):
            for i in range(count):
                path = data / split / kind / f"{kind}{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(kind, seed := seed + 1).save(path)
    for i, name in enumerate(PLANTED_MISLABELS):
        look = Path(name).name.split("-")[0]
        _image(look, 10_000 + i).save(data / name)
    copies = []
    for i, (original, fmt) in enumerate([("train/warm/warm003.png", "PNG"), ("train/cool/cool005.png", "JPEG"),
                                          ("train/warm/warm010.png", "JPEG")]):
        kind = original.split("/")[1]
        copy = f"test/{kind}/copy-{i}.{fmt.lower().replace('jpeg', 'jpg')}"
        with Image.open(data / original) as image:
            buffer = io.BytesIO()
            if fmt == "PNG":  # other bytes, the same pixels
                image.save(buffer, format="PNG", compress_level=9, optimize=True)
            else:
                image.save(buffer, format="JPEG", quality=98)
        (data / copy).write_bytes(buffer.getvalue())
        assert (data / copy).read_bytes() != (data / original).read_bytes()
        copies.append((original, copy))
    cache = api.extract(data, backbone="efficientnet_lite0", image_size=64, precision="fp32", cache=root / "features",
                        progress=False)
    summary = api.audit(cache, models=root / "models", progress=False)  # the JPEG copies sit at about 0.986
    return {"root": root, "data": data, "cache": cache, "audit": summary, "copies": copies}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_planted_mislabels_are_the_top_suspects(planted: dict[str, object]) -> None:
    summary = planted["audit"]
    suspects = _rows(summary.directory / "suspects.csv")
    assert list(suspects[0]) == ["path", "split", "label", "suggested", "score", "id"]
    top = {row["path"] for row in suspects[:len(PLANTED_MISLABELS)]}
    assert top == set(PLANTED_MISLABELS), [row["path"] for row in suspects[:6]]
    for row in suspects[:len(PLANTED_MISLABELS)]:
        assert row["label"] != row["suggested"] and row["split"] == "train"
        assert row["suggested"] == Path(row["path"]).name.split("-")[0]
    scores = [float(row["score"]) for row in suspects]
    assert scores == sorted(scores)  # most suspicious (lowest label quality) first
    probabilities = np.load(summary.directory / "pred_probs.npy", allow_pickle=False)
    ids = (summary.directory / "ids.txt").read_text().split()
    assert probabilities.shape == (len(ids), 2) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert summary.suspects == len(suspects) and summary.images == len(ids)


def test_the_planted_cross_split_copies_are_found(planted: dict[str, object]) -> None:
    summary = planted["audit"]
    pairs = _rows(summary.directory / "duplicates.csv")
    assert list(pairs[0]) == ["path_a", "split_a", "class_a", "path_b", "split_b", "class_b", "similarity", "exact"]
    found = {frozenset((row["path_a"], row["path_b"])) for row in pairs}
    for original, copy in planted["copies"]:
        assert frozenset((original, copy)) in found, (original, copy)
    crossing = [row for row in pairs if row["split_a"] != row["split_b"]]
    assert summary.cross_split_pairs.get("test-train", 0) >= 3 and len(crossing) == sum(
        summary.cross_split_pairs.values())
    details = json.loads((summary.directory / "audit.json").read_text())
    assert details["duplicates"]["cross_split_pairs"] == len(crossing)
    assert details["per_class"]["warm"]["images"] > 0
    for picture in ("map.png", "suspects.png", "duplicates.png"):
        with Image.open(summary.directory / picture) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def test_exact_copies_under_two_classes_are_pairs_of_the_same_bytes(tmp_path: Path) -> None:
    from pipeline.auditing.duplicates import exact_duplicates

    pairs = exact_duplicates(["a", "b", "a", "c", "a"])
    assert {(p.a, p.b) for p in pairs} == {(0, 2), (0, 4), (2, 4)} and all(p.exact for p in pairs)


def test_parquet_and_npz_load_without_the_project_and_equal_the_cache(planted: dict[str, object]) -> None:
    cache, root = planted["cache"], planted["root"]
    written = api.embeddings(cache, root / "embeddings.parquet", progress=False)
    table = _isolated(PARQUET_READER, str(written.path), cwd=root)
    assert table["columns"] == ["id", "path", "class", "label", "split", "embedding"]
    assert table["meta"]["fingerprint"] == cache.fingerprint.as_dict() and table["meta"]["view"]["pooling"] == "avg"
    rows = cache.read()
    vectors = np.concatenate([np.asarray(rows.features[name]).reshape(len(rows), -1) for name in cache.layers], axis=1)
    expected = {path: (digest, split, label, vector) for path, digest, split, label, vector
                in zip(rows.paths, rows.sha256, rows.splits, rows.labels.tolist(), vectors)}
    assert table["rows"] == len(expected) == written.rows
    for i, path in enumerate(table["path"]):
        digest, split, label, vector = expected[path]
        assert (table["id"][i], table["split"][i], table["label"][i]) == (digest, split, label)
        assert table["class"][i] == cache.class_names[label]
        np.testing.assert_array_equal(np.asarray(table["embedding"][i], np.float32), vector)
    npz = api.embeddings(cache, root / "embeddings.npz", progress=False)
    arrays = _isolated(NPZ_READER, str(npz.path), cwd=root)
    assert arrays["paths"] == table["path"] and arrays["ids"] == table["id"]
    np.testing.assert_array_equal(np.asarray(arrays["embeddings"], np.float32),
                                  np.asarray(table["embedding"], np.float32))
    sidecar = json.loads(npz.path.with_suffix(".json").read_text())
    assert sidecar["fingerprint_digest"] == cache.fingerprint.digest() and sidecar["rows"] == written.rows


def test_training_without_the_suspects_keeps_validation_and_test(planted: dict[str, object]) -> None:
    root, summary, cache = planted["root"], planted["audit"], planted["cache"]
    baseline = api.train_head(cache, head="logreg", models=root / "models", c_grid="0.01,1", progress=False)
    cleaned = api.train_head(cache, head="logreg", models=root / "models", c_grid="0.01,1", name="cleaned",
                             exclude=summary.directory / "suspects.csv", progress=False)
    excluded = cleaned.config["excluded"]
    suspects = _rows(summary.directory / "suspects.csv")
    in_train = {row["path"] for row in suspects if row["split"] == "train"}
    assert set(excluded["paths"]) == in_train and excluded["from_training"] == len(in_train) >= 3
    for split in ("validation", "test"):
        assert cleaned.metrics[split]["images"] == baseline.metrics[split]["images"]
    assert cleaned.metrics["train"]["images"] == baseline.metrics["train"]["images"] - len(in_train)
    [row] = [r for r in api.list_runs(root / "models") if r["name"] == "cleaned"]
    assert row["excluded"] == len(in_train)


def test_an_audit_of_random_features_or_too_few_images_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main
    from pipeline.extraction.extract import extract_features

    data = make_image_folder(tmp_path / "data", per_class=4)
    random = extract_features(tiny_options(data, tmp_path / "features")).cache_dir
    assert main(["audit", "--features", str(random), "--models", str(tmp_path / "models")]) == 1
    assert "--weights none" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
    with pytest.raises(PipelineError, match="--folds 1"):
        api.audit(random, folds=1)
    with pytest.raises(PipelineError, match="write FILE.parquet or FILE.npz"):
        api.embeddings(random, tmp_path / "out.csv")


def test_a_class_smaller_than_the_folds_is_refused_naming_it() -> None:
    from pipeline.auditing.labels import check_folds

    with pytest.raises(PipelineError, match="class b has 3 images, too few for 5 folds.*--folds 2"):
        check_folds(np.array([0] * 10 + [1] * 3), ["a", "b"], 5)
    check_folds(np.array([0] * 10 + [1] * 5), ["a", "b"], 5)


def test_suspects_csv_is_a_labels_table_whose_suggestions_relabel_the_planted_mislabels(
        planted: dict[str, object]) -> None:
    from pipeline.labelling import LabelSpec, labelling_from_table

    cache, suspects = planted["cache"], planted["audit"].directory / "suspects.csv"
    labelling = labelling_from_table(cache, LabelSpec(suspects, label="suggested"))
    rows = cache.rows_index()
    for name in PLANTED_MISLABELS:
        look = Path(name).name.split("-")[0]
        assert labelling.class_names[labelling.labels[rows.paths.index(name)]] == look
    untouched = [i for i, path in enumerate(rows.paths) if path not in {r["path"] for r in _rows(suspects)}]
    assert all(labelling.labels[i] == rows.labels[i] for i in untouched)


def test_unlabelled_images_are_audited_for_duplicates_and_multilabel_tables_by_cleanlab(
        planted: dict[str, object]) -> None:
    root, cache, copies = planted["root"], planted["cache"], planted["copies"]
    rows = cache.rows_index()
    table = root / "partial.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:  # the test copies lose their labels
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows([copy, ""] for _, copy in copies)
    summary = api.audit(cache, labels=table, out=root / "audit-partial", progress=False)
    assert summary.details["unlabelled"] == 3 and summary.details["labelled"] == len(rows.paths) - 3
    found = {(r["path_a"], r["path_b"]) for r in _rows(summary.directory / "duplicates.csv")}
    for original, copy in copies:
        assert (original, copy) in found or (copy, original) in found
    tags = root / "tags.csv"
    with open(tags, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "warm", "striped"])
        for path in rows.paths:
            warm = path.split("/")[1] == "warm"  # the folder's label: the planted mislabels carry it
            writer.writerow([path, int(warm), int(not warm)])
    summary = api.audit(cache, labels=tags, label_columns="warm,striped", out=root / "audit-tags", progress=False)
    assert summary.details["task"] == "multilabel"
    suspects = _rows(summary.directory / "suspects.csv")
    flagged = [r for r in suspects if r["path"] in PLANTED_MISLABELS]
    assert len(flagged) >= 2, [r["path"] for r in suspects]  # cleanlab's multi-label filter: 2 of 3 here
    for row in flagged:  # the suggestion is the image's look, as labels of the table's columns
        assert row["suggested"] == ("warm" if Path(row["path"]).name.startswith("warm") else "striped")
    assert all(r["label"] in ("warm", "striped") for r in suspects)
