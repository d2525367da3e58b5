"""Evaluation numbers against scikit-learn, streaming invariance, the figures and the index."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cnnviz.deploy.evaluate import array_batches, evaluate, write_evaluation
from cnnviz.errors import CnnvizError
from cnnviz.report.batching import FigureFile
from cnnviz.report.index_page import add_index_section, write_index


def _softmax_of_input(classes: int):
    """A model whose logits are its (1, 1, K) input: any prediction can be written down."""
    inputs = keras.Input((1, 1, classes))
    return keras.Model(inputs, keras.layers.Activation("softmax")(keras.layers.Flatten()(inputs)))


def _case(count=203, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    labels[labels == 3] = 2  # class 3 never occurs as a true label ...
    logits = rng.normal(size=(count, classes)) * 2
    logits[np.arange(count), labels] += 1.5  # ... mostly right, with mistakes
    return logits.reshape(count, 1, 1, classes).astype(np.float32), labels


def test_numbers_match_scikit_learn():
    from sklearn.metrics import (
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    images, labels = _case()
    model = _softmax_of_input(4)
    names = [f"img{i}" for i in range(len(labels))]
    result = evaluate(model, array_batches(images, labels, names, 64), ["a", "b", "c", "d"],
                      top_k=2)
    probabilities = np.asarray(keras.ops.softmax(images.reshape(len(labels), 4)))
    predicted = probabilities.argmax(axis=1)
    assert (predicted == 3).any(), "the case must predict the class that never occurs"
    np.testing.assert_array_equal(result.confusion, confusion_matrix(labels, predicted,
                                                                     labels=range(4)))
    numbers = result.to_dict()
    assert numbers["accuracy"] == pytest.approx(np.mean(predicted == labels))
    assert numbers["top_k_accuracy"] == pytest.approx(
        top_k_accuracy_score(labels, probabilities, k=2, labels=range(4)))
    assert numbers["log_loss"] == pytest.approx(log_loss(labels, probabilities, labels=range(4)),
                                                rel=1e-5)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(4), zero_division=0)
    for index, name in enumerate("abc"):
        entry = numbers["per_class"][name]
        assert entry["precision"] == pytest.approx(precision[index])
        assert entry["recall"] == pytest.approx(recall[index])
        assert entry["f1"] == pytest.approx(f1[index])
        assert entry["support"] == support[index]
    absent = numbers["per_class"]["d"]  # predicted, never true: recall and F1 undefined
    assert absent["precision"] == 0.0 and absent["recall"] is None and absent["f1"] is None
    for average in ("precision", "recall", "f1"):
        expected = precision_recall_fscore_support(labels, predicted, average="macro",
                                                   zero_division=0)[
            ("precision", "recall", "f1").index(average)]
        assert numbers[f"macro_{average}"] == pytest.approx(expected), average


def test_streaming_gives_the_same_result_for_any_batch_size():
    images, labels = _case(count=97, seed=1)
    model = _softmax_of_input(4)
    names = [str(i) for i in range(len(labels))]
    results = [evaluate(model, array_batches(images, labels, names, size), list("abcd"),
                        mistakes=5).to_dict() for size in (1, 13, 500)]
    for other in results[1:]:
        assert other["confusion_matrix"] == results[0]["confusion_matrix"]
        # pytest.approx takes no list of dicts: one mistake at a time, names and labels equal,
        # confidences within approx's default tolerance.
        mistakes, first = other["most_confident_mistakes"], results[0]["most_confident_mistakes"]
        assert len(mistakes) == len(first) == 5
        for mistake, expected in zip(mistakes, first):
            assert mistake == pytest.approx(expected)
        for key in ("accuracy", "top_k_accuracy", "macro_f1", "log_loss"):
            assert other[key] == pytest.approx(results[0][key], rel=1e-6), key


def test_mistakes_are_the_most_confident_wrong_predictions_in_order():
    images, labels = _case(count=150, seed=2)
    model = _softmax_of_input(4)
    result = evaluate(model, array_batches(images, labels, [f"n{i}" for i in range(150)], 32),
                      list("abcd"), mistakes=6)
    probabilities = np.asarray(keras.ops.softmax(images.reshape(150, 4)))
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != labels)
    confidence = probabilities[wrong].max(axis=1)
    expected = wrong[np.argsort(-confidence, kind="stable")[:6]]
    assert [mistake.name for mistake in result.mistakes] == [f"n{i}" for i in expected]
    for mistake, index in zip(result.mistakes, expected):
        np.testing.assert_array_equal(mistake.image, images[index])
        assert mistake.true_label == labels[index]


def test_a_single_sigmoid_unit_is_two_classes():
    inputs = keras.Input((1, 1, 1))
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(keras.layers.Flatten()(inputs)))
    logits = np.array([-3, -1, 2, 4, 1], np.float32).reshape(5, 1, 1, 1)
    labels = np.array([0, 1, 1, 1, 0])
    result = evaluate(model, array_batches(logits, labels, list("vwxyz")), ["no", "yes"])
    np.testing.assert_array_equal(result.confusion, [[1, 1], [1, 2]])


def test_bad_labels_and_class_counts_are_refused():
    model = _softmax_of_input(3)
    images = np.zeros((2, 1, 1, 3), np.float32)
    with pytest.raises(CnnvizError, match="label 5 is not a class of the model"):
        evaluate(model, array_batches(images, np.array([0, 5]), ["a", "b"]), list("abc"))
    with pytest.raises(CnnvizError, match="the model has 3 outputs but the data has 2 classes"):
        evaluate(model, array_batches(images, np.array([0, 1]), ["a", "b"]), ["x", "y"])
    with pytest.raises(CnnvizError, match="has no images"):
        evaluate(model, iter(()), list("abc"))


def test_written_files_decode_and_agree(tmp_path):
    images, labels = _case(count=60, seed=3)
    result = evaluate(_softmax_of_input(4),
                      array_batches(images, labels, list(map(str, range(60)))),
                      list("abcd"), source="a test")
    data_file, figures = write_evaluation(result, tmp_path)
    saved = json.loads(data_file.read_text())
    assert saved["confusion_matrix"] == result.confusion.tolist()
    assert saved["images"] == 60 and len(saved["most_confident_mistakes"]) == len(result.mistakes)
    assert [figure.path.name for figure in figures] == ["confusion_matrix.png", "mistakes.png"]
    for figure in figures:
        with Image.open(figure.path) as png:
            assert png.format == "PNG" and png.size[0] > 300
    assert "accuracy" in figures[0].caption and "a test" in figures[0].caption
    assert (tmp_path / "evaluation.txt").read_text().startswith("Evaluation on a test: 60 images")


def test_confusion_figure_prints_counts_and_row_shares():
    from cnnviz.plot.evaluation import confusion_matrix_figure

    figure = confusion_matrix_figure(np.array([[3, 1], [0, 0]]), ["cat", "dog"])
    texts = [[text.get_text() for text in ax.texts] for ax in figure.axes[:2]]
    assert texts[0] == ["3", "1", "0", "0"]
    assert texts[1] == ["0.75", "0.25", "0", "0"]  # an empty row stays 0, not NaN


def _figure(folder: Path, name: str) -> FigureFile:
    path = folder / name
    path.write_bytes(b"png")
    return FigureFile(path, f"caption of {name}")


def test_index_sections_are_added_and_replaced(tmp_path):
    write_index(tmp_path, "a run", [("Training", [_figure(tmp_path, "curves.png")])])
    add_index_section(tmp_path, "Evaluation", [_figure(tmp_path, "one.png")])
    add_index_section(tmp_path, "Evaluation", [_figure(tmp_path, "two.png")])
    page = (tmp_path / "index.html").read_text()
    assert page.count("<h2>") == 2 and "curves.png" in page and "two.png" in page
    assert "one.png" not in page and "<title>a run</title>" in page


def test_a_section_is_appended_to_an_index_written_without_index_json(tmp_path):
    write_index(tmp_path, "old run", [("Training", [_figure(tmp_path, "curves.png")])])
    (tmp_path / "index.json").unlink()
    add_index_section(tmp_path, "Evaluation", [_figure(tmp_path, "cm.png")])
    page = (tmp_path / "index.html").read_text()
    assert "curves.png" in page and "cm.png" in page and page.index("curves") < page.index("cm.png")


def test_test_limit_keeps_a_stratified_seeded_subset_of_the_test_split():
    from cnnviz.config.loading import load_config
    from cnnviz.data import load_dataset

    digits = Path(__file__).parent.parent / "configs" / "digits.yaml"
    full = load_dataset(load_config(digits)).test
    limited = load_dataset(load_config(digits, ["data.test_limit=50"])).test
    again = load_dataset(load_config(digits, ["data.test_limit=50"])).test
    assert len(limited) == 50 and np.array_equal(limited.rows, again.rows)
    assert set(limited.rows) <= set(full.rows), "a subset of the same test split"
    counts = np.bincount(limited.labels, minlength=10)
    assert counts.min() >= 4 and counts.max() <= 6, f"each class in its share: {counts}"
