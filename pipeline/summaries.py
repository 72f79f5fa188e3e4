"""What each stage says when it ends, in words: the same text from the command line and from the
Python API (which prints it unless `progress=False`; the command line prints it itself, or JSON)."""

from __future__ import annotations

from typing import Any

from pipeline.errors import command, option, spoken_by_command_line


def extract_text(summary: Any) -> str:
    lines: list[str] = []
    say = lines.append
    say(
        f"extracted: {summary.images} images in cache, {summary.new} new, {summary.reused} reused, "
        f"{len(summary.skipped)} skipped; {summary.seconds:.1f} s in all"
    )
    if summary.new:
        say(f"  speed: {summary.new / summary.seconds:.1f} images/s by wall clock (scan, set-up and weights "
              f"included); {summary.images_per_second:.1f} images/s in the extraction loop (decode, backbone, "
              f"shards: the progress bar's figure)"
              + (f"; {summary.warm_images_per_second:.1f} images/s once warm (after the first batch, which "
                 "compiles the backbone)" if summary.warm_images_per_second else ""))
    if summary.engine == "ray" and summary.new:
        say(f"ray: shards written on {summary.nodes} node(s); {summary.retried_units} units retried, "
              f"{summary.restarted_actors} backbone actors restarted")
    shown = 20
    for item in summary.skipped[:shown]:
        say(f"  skipped {item['path']}: {item['reason']}")
    if len(summary.skipped) > shown:
        say(f"  ... and {len(summary.skipped) - shown} more: see skipped in {summary.cache_dir / 'manifest.json'}")
    for note in summary.notes:
        say(f"note: {note}")
    counts = _split_counts(summary.cache_dir)
    if counts:
        total = sum(counts.values()) or 1
        say("  splits: " + ", ".join(f"{split} {count} ({count / total:.1%})" for split, count in counts.items())
            + " (by the stable rule on file names: each class's shares come out near the fractions asked for)")
    say(f"cache: {summary.cache_dir}")
    return "\n".join(lines)


def run_text(summary: Any, headline: str) -> str:
    """A run's report of its reported split, then a line per split."""
    from pipeline import report

    lines = [summary.report, headline]
    for split, values in summary.metrics.items():
        if values.get("images"):
            lines.append(f"  {split:<10} accuracy {report.accuracy_text(values)}  "
                         f"mean per-class {values['mean_per_class_accuracy']:.2%}  macro F1 {values['macro_f1']:.4f}  "
                         f"loss {values['loss']:.4f}  ({values['images']} images)")
    lines.append(f"run: {summary.directory}")
    return "\n".join(lines)


def audit_text(summary: Any) -> str:
    details = summary.details
    lines: list[str] = []
    say = lines.append
    issues, duplicates = details["label_issues"], details["duplicates"]
    say(f"audit of {summary.images} images ({', '.join(details['backbones'])}): {summary.seconds:.1f} s")
    by_split = ", ".join(f"{split} {count}" for split, count in sorted(issues["by_split"].items()))
    say(f"  label suspects: {summary.suspects} (cleanlab on {issues['folds']}-fold out-of-fold probabilities"
          + (f"; {by_split})" if by_split else ")"))
    say(f"  duplicate pairs: {summary.duplicate_pairs} ({summary.exact_pairs} of the same bytes, "
          f"{duplicates['exact_under_two_classes']} of them under two classes; near: cosine >= "
          f"{duplicates['similarity_threshold']}, {duplicates['neighbour_search']})")
    bands = duplicates.get("pairs_by_similarity")
    if bands:
        say("    by similarity: " + ", ".join(f"{band} {count}" for band, count in bands.items())
            + " (re-encoded or resized copies sit near 1; distinct look-alikes lower)")
    crossing = ", ".join(f"{splits} {count}" for splits, count in sorted(summary.cross_split_pairs.items()))
    say(f"  across splits: {sum(summary.cross_split_pairs.values())}" + (f" ({crossing})" if crossing else ""))
    for name, counts in details["per_class"].items():
        say(f"    {name:<20} {counts['images']:>7} images  {counts['suspects']:>5} suspects  "
              f"{counts['in_duplicate_pairs']:>5} in duplicate pairs")
    say(f"  look at: {summary.directory / 'map.png'}, suspects.png, duplicates.png; the lists: suspects.csv, "
          "duplicates.csv; pred_probs.npy with ids.txt (for cleanlab)")
    suspects = summary.directory / "suspects.csv"
    say("  train without the suspects: " + (f"{command()} train-head {option('exclude', suspects)}"
                                           if spoken_by_command_line()
                                           else f"pipeline.train_head(cache, {option('exclude', str(suspects))})"))
    say(f"audit: {summary.directory}")
    return "\n".join(lines)


def export_text(summary: Any) -> str:
    from pipeline.serving.agreement import describe as describe_agreement

    lines: list[str] = []
    say = lines.append
    say(f"exported {summary.details['run']} as {summary.format}: {summary.path} ({summary.bytes / 2**20:.1f} MB, "
          f"{summary.seconds:.1f} s)")
    say(f"  input: {summary.details['format']['input']}")
    say(f"  output: {summary.details['format']['output']}")
    views = summary.details["format"].get("test_time_views", {})
    if views.get("views", "none") != "none":
        say(f"  test-time views: {views['views']} ({views['count']} backbone passes an image, averaged inside)")
    details = summary.details["format"]
    if "largest_difference_to_predict" in details:
        say(f"  checked with ONNX Runtime (opset {details['onnx']['opset'].get('ai.onnx')}): largest probability "
              f"difference to the run's model {details['largest_difference_to_predict']:.2e}")
    if "int8" in details:
        agreement = details["int8"]
        say(f"  int8 on {agreement['images']} validation images: accuracy {agreement['accuracy_float32']:.2%} "
              f"(float32) -> {agreement['accuracy_int8']:.2%}, top class agreeing on "
              f"{agreement['top_class_agreement']:.1%}, largest probability difference "
              f"{agreement['largest_probability_difference']:.3f}")
        if "images_per_second" in agreement:
            rates = agreement["images_per_second"]
            say(f"  int8 speed on this machine: {rates['int8']} images/s against float32's {rates['float32']} "
                f"({agreement['speedup']}x)")
    if "largest_difference_to_keras_float32" in summary.details["format"]:
        say(f"  checked with the TFLite interpreter: largest probability difference to the Keras model "
              f"{summary.details['format']['largest_difference_to_keras_float32']:.2e}")
    agreement = details["agreement_with_predict"]
    say(f"  {describe_agreement(agreement, details['precision'], details['run_precision'])}")
    say(f"  beside it: {summary.path.parent / 'labels.txt'}, {summary.path.parent / 'export.json'}")
    return "\n".join(lines)


def _split_counts(cache: Any) -> dict[str, int]:
    """Images per split, as the cache's manifest counts them ({} where it cannot be read)."""
    from pipeline import atomic
    from pipeline.cache.store import MANIFEST_NAME

    try:
        counts = atomic.read_json(cache / MANIFEST_NAME).get("counts", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {split: int(n) for split, n in counts.items() if isinstance(n, int)} if isinstance(counts, dict) else {}


def suggest_text(found: Any) -> str:
    """suggest's summary: what was ranked, how, and where the table is."""
    details = found.details
    lines = [f"suggested {len(found.rows)} of {details['unlabelled']} unlabelled images ({details['labelled']} "
             f"labelled) by {details['how']}, in {found.seconds:.1f} s"]
    lines += [f"note: {note}" for note in details["notes"]]
    for row in found.rows[:10]:
        lines.append(f"  {row['rank']:>3}. {row['path']}  guess {row['guess'] or '-'}  score {row['score']:.3f}")
    if found.path is not None:
        lines.append(f"table: {found.path} (fill in its {details['label_column']!r} column, then train-head --labels "
                     f"TABLE --labels {found.path}: no backbone pass)")
    return "\n".join(lines)


def report_text(found: Any) -> str:
    """report's summary: the page, what it shows, what is missing."""
    kept = "in the page" if found.thumbnails == "embed" else f"in {found.path.parent / (found.path.stem + '_files')}"
    lines = [f"report: {found.path} ({found.images} images, thumbnails {kept}; "
             f"{', '.join(found.sections) or 'no sections'}) in {found.seconds:.1f} s"]
    if found.missing:
        lines.append(f"  {len(found.missing)} images are missing (e.g. {found.missing[0]}): the page lists them")
    lines += [f"note: {note}" for note in found.notes]
    if found.screenshot is not None:
        lines.append(f"screenshot: {found.screenshot}" + (f" (the browser's console: {found.console_errors[0]})"
                                                          if found.console_errors else ""))
    lines.append(f"open it in a browser: {found.path.resolve().as_uri()}")
    return "\n".join(lines)
