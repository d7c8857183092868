"""error_text.summary: the line of an error that says what went wrong."""

import pytest
import tensorflow as tf

from leo_tf import error_text

OUT_OF_RANGE = "indices = 5 is not in [0, 2)"


def _raised(function):
    with pytest.raises(Exception) as info:
        function()
    return info.value


@tf.function
def _graph_gather(index):
    return tf.gather(tf.constant([1, 2]), index)


def _dataset_decode():
    dataset = tf.data.Dataset.from_tensor_slices([b"not an image"])
    decoded = dataset.map(lambda data: tf.io.decode_image(data, channels=1))
    return next(iter(decoded))


def test_an_eager_ops_error_without_its_function_node_and_op():
    """`{{function_node ...}} <message> [Op:GatherV2] name: `."""
    error = _raised(lambda: tf.gather(tf.constant([1, 2]), 5))
    assert str(error).startswith("{{function_node ")
    assert error_text.summary(error) == OUT_OF_RANGE


def test_a_graph_execution_error_without_the_python_stack_of_its_node():
    error = _raised(lambda: _graph_gather(tf.constant(5)))
    assert str(error).startswith("Graph execution error:")
    assert error_text.summary(error) == OUT_OF_RANGE


def test_a_tf_data_error_keeps_its_message_and_leaves_the_node_line_out():
    error = _raised(_dataset_decode)
    summary = error_text.summary(error)
    assert summary.endswith(
        "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
        "required."
    )
    assert "{{" not in summary and "[Op:" not in summary


@pytest.mark.parametrize(
    "error, summary",
    [
        (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
        (ValueError("first\nsecond"), "first"),
        (MemoryError(), "(no message)"),
    ],
)
def test_other_errors_give_their_first_line(error, summary):
    assert error_text.summary(error) == summary
