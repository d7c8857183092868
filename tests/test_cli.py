"""Every way a command can fail ends in one line `leo_tf.<prog>: error: ...`."""

import concurrent.futures
import subprocess
import sys

import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from leo_tf import cli, export, train
from leo_tf import config as config_lib
from tests import run_fixtures

FLAGS = flags.FLAGS
# A TensorFlow error from a compiled function, as TensorFlow words it.
GRAPH_ERROR = (
    "Graph execution error:\n\nDetected at node GatherV2 defined at (most recent "
    'call last):\n  File "<string>", line 8, in <module>\n\n  File "<string>", '
    "line 5, in f\n\nindices[0] = 5 is not in [0, 2)\n\t [[{{node GatherV2}}]] "
    "[Op:__inference_f_12]"
)


@pytest.fixture(autouse=True)
def _restore_flags():
    with flagsaver.flagsaver():
        FLAGS.unparse_flags()
        yield
    FLAGS.unparse_flags()


def _run(main, *args):
    """cli.run's exit status for `main` called with flags `args`."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run("leo_tf.test", main, ["leo_tf.test", *args])
    return exit_info.value.code


def _raising(error):
    def main(argv):
        del argv
        raise error

    return main


def _last_line(text):
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "error,line",
    [
        (RuntimeError("boom\nsecond line"), "RuntimeError: boom"),
        (OSError(28, "No space left on device"), "OSError: [Errno 28] No space"),
        (MemoryError(), "MemoryError: (no message)"),
        (
            tf.errors.InvalidArgumentError(None, None, GRAPH_ERROR),
            "InvalidArgumentError: indices[0] = 5 is not in [0, 2)",
        ),
        (
            tf.errors.ResourceExhaustedError(
                None,
                None,
                "{{function_node __wrapped__SaveV2_dtypes_34_device_/job:localhost/"
                "replica:0/task:0/device:CPU:0}} run/ckpt-40_temp/part; No space "
                "left on device [Op:SaveV2] name: ",
            ),
            "ResourceExhaustedError: run/ckpt-40_temp/part; No space left on "
            "device (rerun",
        ),
    ],
)
def test_unexpected_error_is_one_line_naming_its_type(capsys, error, line):
    assert _run(_raising(error)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"leo_tf.test: error: {line}")
    assert err.rstrip().endswith("(rerun with --debug for the traceback)")


def test_debug_prints_the_traceback_before_the_line(capsys):
    assert _run(_raising(RuntimeError("boom")), "--debug") == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert _last_line(err) == "leo_tf.test: error: RuntimeError: boom"


def test_expected_failure_prints_its_message(capsys):
    assert _run(_raising(cli.Failure("--x=1: must be 2"))) == 1
    assert capsys.readouterr().err == "leo_tf.test: error: --x=1: must be 2\n"


def test_interrupt_exits_130_quietly(capsys):
    assert _run(_raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_stopped_run_exits_128_plus_the_signal_with_its_line(capsys, name, status):
    stop = cli.Stopped(name, "checkpoint of step 3 of 9 saved")
    assert _run(_raising(stop), "--debug") == status
    assert capsys.readouterr().err == (
        f"leo_tf.test: stopped: {name}: checkpoint of step 3 of 9 saved\n"
    )


def test_unparsable_flag_is_one_line(capsys):
    config_lib.define_flags()  # --seed
    assert _run(_raising(AssertionError("not reached")), "--seed=abc") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("leo_tf.test: error: flag --seed=abc: invalid literal")


@pytest.mark.parametrize(
    "name, problem", [("missing.cfg", "no such file"), ("folder", "is a directory")]
)
def test_unreadable_flagfile_is_one_line_naming_it(capsys, tmp_path, name, problem):
    (tmp_path / "folder").mkdir()
    path = tmp_path / name
    assert _run(_raising(AssertionError("not reached")), f"--flagfile={path}") == 1
    assert capsys.readouterr().err == (
        f"leo_tf.test: error: --flagfile={path}: {problem}\n"
    )


def _entry_point(monkeypatch, module, *args):
    """The exit status of `module.run()`, the console entry point, with args."""
    monkeypatch.setattr(sys, "argv", [module.__name__, *args])
    with pytest.raises(SystemExit) as exit_info:
        module.run()
    return exit_info.value.code


@pytest.mark.parametrize("seed", [-1, 2**31 - 2, 2**70])
def test_train_refuses_a_seed_out_of_range_in_one_line(
    capsys, monkeypatch, toy_data, tmp_path, seed
):
    status = _entry_point(
        monkeypatch,
        train,
        f"--data_path={toy_data}",
        "--dataset_name=toy",
        f"--checkpoint_path={tmp_path / 'run'}",
        "--num_steps_limit=1",
        f"--seed={seed}",
    )
    assert status == 1
    assert capsys.readouterr().err == (
        f"leo_tf.train: error: --seed={seed}: must be an integer in "
        "[0, 2147483645]\n"
    )
    assert not (tmp_path / "run").exists()


def test_export_flag_that_does_not_parse_is_one_line(capsys, monkeypatch, tmp_path):
    status = _entry_point(
        monkeypatch, export, f"--export_dir={tmp_path / 'export'}", "--overwrite=maybe"
    )
    assert status == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("leo_tf.export: error: flag --overwrite=maybe: ")
    assert not (tmp_path / "export").exists()


def _bad_flags(tmp_path):
    """{command: (its arguments with one bad flag, its error line)}."""
    return {
        "leo_tf.embed": (
            [f"--data_path={tmp_path}", "--seed=-1"],
            "--seed=-1: must be an integer in [0, 2147483645]",
        ),
        "leo_tf.export": (
            [
                f"--checkpoint_path={tmp_path / 'missing'}",
                f"--export_dir={tmp_path / 'export'}",
            ],
            f"--checkpoint_path={tmp_path / 'missing'}: not a directory",
        ),
        "leo_tf.search": (
            [f"--search_dir={tmp_path / 'search'}", "--space=num_classes:int:1:5"],
            "--space=num_classes:int:1:5: --num_classes=1: must be at least 2 "
            "(N in N-way classification)",
        ),
        "leo_tf.regression": (
            [f"--checkpoint_path={tmp_path / 'run'}", "--num_latents=0"],
            "--num_latents=0: must be at least 1",
        ),
    }


def _imported_modules(stderr):
    """The modules `python -X importtime` reports in `stderr`."""
    return {
        line.rsplit("|", 1)[-1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:")
    }


@pytest.mark.slow
def test_bad_flags_fail_in_one_line_before_tensorflow_loads(tmp_path):
    """Every command but leo_tf.train (tested in test_train_cli.py), each in a
    child process that `-X importtime` makes list the modules it imported:
    no TensorFlow, no Keras, nothing written."""
    commands = _bad_flags(tmp_path)

    def run(module):
        args, _ = commands[module]
        return run_fixtures.run_command(
            [sys.executable, "-X", "importtime", "-m", module, *args], timeout=120
        )

    with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
        completed = dict(zip(commands, pool.map(run, commands)))
    for module, (_, line) in commands.items():
        process = completed[module]
        assert process.returncode == 1, module
        assert _last_line(process.stderr) == f"{module}: error: {line}"
        imported = _imported_modules(process.stderr)
        assert "leo_tf.cli" in imported, module
        assert not {"tensorflow", "keras"} & imported, module
    assert not list(tmp_path.iterdir())


def test_flags_are_checked_before_tensorflow_is_imported():
    """A fresh interpreter without TensorFlow: cheap, not slow."""
    completed = run_fixtures.run_python(
        "import sys, leo_tf.config; print('tensorflow' in sys.modules)",
        timeout=60,
        check=True,
    )
    assert completed.stdout.strip() == "False"


def test_a_closed_standard_output_ends_the_command_quietly_with_141():
    """`leo_tf.<command> | head -1`: the reader goes away; the command ends
    as a program that SIGPIPE ends would, with no error line."""
    source = (
        "from leo_tf import cli\n"
        "def main(argv):\n"
        "    for line in range(10**7):\n"
        "        print(line, flush=True)\n"
        "cli.run('leo_tf.test', main)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", source],
        cwd=run_fixtures.REPO,
        env=run_fixtures.subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline() == "0\n"
    process.stdout.close()
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == ""


def test_a_broken_pipe_that_is_not_standard_output_is_an_error(capsys):
    """A socket's or a child's pipe: an unexpected error, named, exit 1."""
    assert _run(_raising(BrokenPipeError(32, "Broken pipe"))) == 1
    assert capsys.readouterr().err == (
        "leo_tf.test: error: BrokenPipeError: [Errno 32] Broken pipe (rerun with "
        "--debug for the traceback)\n"
    )
