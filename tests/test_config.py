"""The flags: derived from the typed configs, with the authors' names and defaults.

Also their validation and the flagfiles.
"""

import dataclasses

import pytest
from absl import flags
from absl.testing import flagsaver

from leo_tf import config as config_lib
from leo_tf import embed, export, search_space
from leo_tf.data import embeddings, meta_dataset
from leo_tf.regression import config as regression_config
from tests import run_fixtures

FLAGS = flags.FLAGS
config_lib.define_flags()

# The authors' config.py and runner.py defaults (github.com/deepmind/leo).
AUTHORS_DEFAULTS = {
    "data_path": None,
    "dataset_name": "miniImageNet",
    "embedding_crop": "center",
    "train_on_val": False,
    "inner_unroll_length": 5,
    "finetuning_unroll_length": 5,
    "num_latents": 64,
    "inner_lr_init": 1.0,
    "finetuning_lr_init": 0.001,
    "dropout_rate": 0.5,
    "kl_weight": 1e-3,
    "encoder_penalty_weight": 1e-9,
    "l2_penalty_weight": 1e-8,
    "orthogonality_penalty_weight": 1e-3,
    "num_classes": 5,
    "num_tr_examples_per_class": 1,
    "num_val_examples_per_class": 15,
    "metatrain_batch_size": 12,
    "metavalid_batch_size": 200,
    "metatest_batch_size": 200,
    "num_steps_limit": 100000,
    "outer_lr": 1e-4,
    "gradient_threshold": 0.1,
    "gradient_norm_threshold": 0.1,
    "checkpoint_path": "/tmp/leo",
    "checkpoint_steps": 1000,
    "evaluation_mode": False,
}


def _config(tmp_path, *args):
    """Parses `args` (after a fresh parse) and returns the RunConfig."""
    FLAGS.unparse_flags()
    FLAGS(["leo_tf.train", f"--data_path={tmp_path}", *args])
    return config_lib.from_flags()


@pytest.fixture(autouse=True)
def _restore_flags():
    with flagsaver.flagsaver():
        yield
    FLAGS.unparse_flags()


def test_every_authors_flag_has_its_name_and_default():
    for name, default in AUTHORS_DEFAULTS.items():
        assert FLAGS[name].default == default, name


def test_defaults_become_typed_configs(tmp_path):
    config = _config(tmp_path, "--checkpoint_path=" + str(tmp_path / "run"))
    assert config.model.num_latents == 64
    assert config.model.dropout_rate == 0.5
    assert config.optimizer.outer_lr == 1e-4
    assert config.data.metatrain_batch_size == 12
    assert config.data.total_examples_per_class == 600
    assert config.train.checkpoint_steps == 1000
    assert config.train.seed == 0
    assert config.data.data_path == str(tmp_path)


@pytest.mark.parametrize("seed", [-1, 2**31 - 2, 2**70])
def test_seed_outside_what_the_initialisers_take_is_refused(tmp_path, seed):
    # Keras reduces initialiser seeds modulo 2^31 - 2; NumPy's take no sign.
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"^--seed={seed}: must be an integer in \[0, 2147483645\]$",
    ):
        _config(tmp_path, f"--seed={seed}")


@pytest.mark.parametrize("flag", ["num_steps_limit", "num_metatest_episodes"])
def test_count_beyond_int64_is_refused(tmp_path, flag):
    with pytest.raises(
        config_lib.ConfigError,
        match=rf"^--{flag}={2**63}: must be at most {2**63 - 1} ",
    ):
        _config(tmp_path, f"--{flag}={2**63}")
    _config(tmp_path, f"--{flag}={2**63 - 1}")


def test_one_meta_test_episode_is_refused_it_has_no_interval(tmp_path):
    with pytest.raises(
        config_lib.ConfigError, match=r"^--num_metatest_episodes=1: must be at least 2"
    ):
        _config(tmp_path, "--num_metatest_episodes=1")
    assert (
        _config(tmp_path, "--num_metatest_episodes=2").train.num_metatest_episodes == 2
    )


def test_largest_seed_is_accepted(tmp_path):
    assert _config(tmp_path, "--seed=2147483645").train.seed == 2**31 - 3


def test_data_path_defaults_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    FLAGS.unparse_flags()
    FLAGS(["leo_tf.train", "--dataset_name=synthetic"])
    config = config_lib.from_flags()
    assert config.data.data_path == str(tmp_path / "cache" / "leo_tf" / "data")


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--num_classes=1", "--num_classes=1: must be at least 2"),
        ("--num_tr_examples_per_class=0", "--num_tr_examples_per_class=0: must be"),
        ("--num_val_examples_per_class=0", "--num_val_examples_per_class=0: must be"),
        ("--dropout_rate=1.0", "--dropout_rate=1.0: must be 0 or in [1.53e-05, 1)"),
        ("--dropout_rate=-0.1", "--dropout_rate=-0.1: must be 0 or in [1.53e-05, 1)"),
        ("--dropout_rate=1e-6", "--dropout_rate=1e-06: must be 0 or in [1.53e-05, 1)"),
        ("--outer_lr=-1e-4", "--outer_lr=-0.0001: must be a finite number > 0"),
        ("--outer_lr=0", "--outer_lr=0.0: must be a finite number > 0"),
        ("--inner_lr_init=-1", "--inner_lr_init=-1.0: must be a finite number >= 0"),
        ("--kl_weight=nan", "--kl_weight=nan: must be a finite number >= 0"),
        ("--gradient_threshold=-1", "--gradient_threshold=-1.0: must be"),
        (
            "--checkpoint_steps=0",
            "--checkpoint_steps=0: must be at least 1 when training",
        ),
        ("--num_steps_limit=0", "--num_steps_limit=0: must be at least 1"),
        ("--metatrain_batch_size=0", "--metatrain_batch_size=0: must be at least 1"),
        ("--num_latents=0", "--num_latents=0: must be at least 1"),
        ("--inner_unroll_length=-1", "--inner_unroll_length=-1: must be at least 0"),
        ("--embedding_crop=left", "--embedding_crop=left: must be one of center"),
        ("--checkpoint_path=", "--checkpoint_path=: must name a directory"),
        ("--checkpoint_path=  ", "--checkpoint_path=  : must name a directory"),
    ],
)
def test_invalid_values_name_the_flag(tmp_path, flag, message):
    with pytest.raises(config_lib.ConfigError) as error:
        _config(tmp_path, "--dataset_name=synthetic", flag)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_tiered_imagenet_has_center_crops_only(tmp_path):
    with pytest.raises(
        config_lib.ConfigError,
        match="--embedding_crop=multiview: " "tieredImageNet has center crops only",
    ):
        _config(tmp_path, "--dataset_name=tieredImageNet", "--embedding_crop=multiview")


def test_unknown_dataset_lists_the_available_ones(tmp_path):
    """Checked where the data is opened: the configuration reads no disk."""
    (tmp_path / "omniglot").mkdir()
    config = _config(tmp_path, "--dataset_name=miniimagenet")
    with pytest.raises(embeddings.DataError) as error:
        meta_dataset.load_classes(config.data, "train")
    expected = tmp_path / "miniimagenet" / "center" / "train_embeddings.pkl"
    assert str(error.value) == (
        "--dataset_name=miniimagenet: neither built in nor a directory under "
        f"--data_path={tmp_path} (expected {expected}, ...; python -m "
        "leo_tf.embed makes them from images); available: "
        "miniImageNet, tieredImageNet, synthetic, omniglot"
    )
    # A directory under data_path is a valid custom data set.
    omniglot = _config(tmp_path, "--dataset_name=omniglot").data
    meta_dataset.check_dataset_name(omniglot)


def test_evaluation_mode_accepts_checkpoint_steps_zero(tmp_path):
    """The authors' evaluation needed --checkpoint_steps=0; ours takes any."""
    config = _config(
        tmp_path,
        "--dataset_name=synthetic",
        "--evaluation_mode",
        "--checkpoint_steps=0",
    )
    assert config.train.evaluation_mode


TRAIN_FLAGFILES = sorted(
    path
    for path in (run_fixtures.REPO / "flags").glob("*.cfg")
    if not path.name.startswith("regression_")  # python -m leo_tf.regression
    and not path.name.endswith("_embed.cfg")  # python -m leo_tf.embed
)


@pytest.mark.parametrize("flagfile", TRAIN_FLAGFILES, ids=lambda p: p.name)
def test_flagfiles_parse_and_validate(tmp_path, flagfile):
    for name in ("miniImageNet", "tieredImageNet", "omniglot"):
        (tmp_path / name).mkdir()
    config = _config(tmp_path, f"--flagfile={flagfile}")
    text = flagfile.read_text()
    assert text.startswith("#"), "each flagfile says what it reproduces"
    if "miniImageNet_5way1shot" in flagfile.name:
        assert config.optimizer.outer_lr == 2.739071e-4
        assert config.model.kl_weight == 0.756143
        assert config.data.num_tr_examples_per_class == 1
    if "tieredImageNet_5way5shot" in flagfile.name:
        assert config.model.orthogonality_penalty_weight == 2.481216e-2
        assert config.data.num_tr_examples_per_class == 5


def test_num_towers_must_divide_the_batch_sizes(tmp_path):
    with pytest.raises(
        config_lib.ConfigError,
        match=(r"--num_towers=5: must divide --metatrain_batch_size=12"),
    ):
        _config(tmp_path, "--dataset_name=synthetic", "--num_towers=5")
    assert (
        _config(tmp_path, "--dataset_name=synthetic", "--num_towers=4").train.num_towers
        == 4
    )


# --- Flags derived from the typed configs ----------------------------------------

# Every command's dataclasses, and the fields that are constants, not flags.
COMMANDS = {
    "train": (
        [cls for _, cls in config_lib.SECTIONS],
        {"total_examples_per_class", "num_metavalid_batches"},
    ),
    "export": (
        [*(cls for _, cls in config_lib.SECTIONS), export.ExportOptions],
        {"total_examples_per_class", "num_metavalid_batches"},
    ),
    "search": (
        [*(cls for _, cls in config_lib.SECTIONS), search_space.SearchOptions],
        {"total_examples_per_class", "num_metavalid_batches"},
    ),
    "embed": ([cls for _, cls in embed.SECTIONS], set()),
    "regression": ([regression_config.RegressionConfig], set()),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_one_flag_with_its_default_and_help(command):
    classes, constants = COMMANDS[command]
    values = flags.FlagValues()
    config_lib.define_flags_of(classes, values)
    fields = [f for cls in classes for f in dataclasses.fields(cls)]
    assert {f.name for f in fields if f.name not in constants} == set(values)
    assert {f.name for f in fields} - set(values) == constants
    for field in fields:
        if field.name in constants:
            continue
        flag = values[field.name]
        default = field.default
        if isinstance(default, tuple):  # a list flag
            default = list(default)
        assert flag.default == default, field.name
        # absl adds "<a|b>: " before an enum's help, a note after a multi flag's.
        assert field.metadata["help"] in flag.help, field.name
    # Parsed with no arguments, the flags build the dataclasses' defaults.
    values(["prog"])
    for cls in classes:
        assert config_lib.values_of(cls, values) == cls(), cls.__name__


PATH_FLAGS = {
    "train": {"data_path", "checkpoint_path"},
    "export": {"data_path", "checkpoint_path", "export_dir", "checkpoint"},
    "search": {"data_path", "checkpoint_path", "search_dir"},
    "embed": {"packed_omniglot", "image_dir", "tfds_data_dir", "data_path"},
    "regression": {"checkpoint_path"},
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_leading_tilde_in_a_path_flag_is_the_home_directory(command, monkeypatch):
    """`--data_path=~/emb` reaches the program unexpanded (the shell expands
    `~` only at a word's start); path flags expand it, other flags do not."""
    monkeypatch.setenv("HOME", "/home/someone")
    classes, _ = COMMANDS[command]
    values = flags.FlagValues()
    config_lib.define_flags_of(classes, values)
    fields = {f.name: f for cls in classes for f in config_lib.option_fields(cls)}
    paths = {name for name, f in fields.items() if f.metadata["path"]}
    assert paths == PATH_FLAGS[command]
    plain = {
        name
        for name, f in fields.items()
        if f.type is str and name not in paths and not f.metadata["choices"]
    }
    values(
        [
            "prog",
            *(f"--{name}=~/runs/{name}" for name in paths),
            *(f"--{name}=~x" for name in plain),
        ]
    )
    for cls in classes:
        built = config_lib.values_of(cls, values)
        for field in config_lib.option_fields(cls):
            value = getattr(built, field.name)
            if field.name in paths:
                assert value == f"/home/someone/runs/{field.name}"
            elif field.name in plain:
                assert value == "~x"


def test_shared_hyperparameters_have_one_help_and_check():
    leo = config_lib.ModelConfig
    regression = regression_config.RegressionConfig
    for name in (
        "kl_weight",
        "inner_lr_init",
        "num_latents",
        "finetuning_unroll_length",
    ):
        ours, theirs = (
            next(f for f in dataclasses.fields(cls) if f.name == name)
            for cls in (leo, regression)
        )
        assert ours.metadata == theirs.metadata, name
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^--kl_weight=-1.0: must be a finite number >= 0$",
    ):
        config_lib.check(regression(kl_weight=-1.0))


def test_a_broken_check_names_the_flag_and_the_value():
    with pytest.raises(
        config_lib.ConfigError, match=r"^--num_latents=0: must be at least 1$"
    ):
        config_lib.check(config_lib.ModelConfig(num_latents=0))
    with pytest.raises(
        config_lib.ConfigError,
        match=r"^--distribution=tpu: must be one of none, mirrored, multi_worker$",
    ):
        config_lib.check(config_lib.TrainConfig(distribution="tpu"))


def test_field_checks_come_before_cross_field_rules():
    """A bad value is named even where a combination is also wrong."""
    config = config_lib.RunConfig(
        config_lib.ModelConfig(),
        config_lib.OptimizerConfig(),
        config_lib.DataConfig(
            "unused", dataset_name="tieredImageNet", embedding_crop="multiview"
        ),
        config_lib.TrainConfig(seed=-1),
    )
    with pytest.raises(config_lib.ConfigError, match=r"^--seed=-1: "):
        config_lib.check(config)


def test_library_imports_define_no_flag_and_load_no_tensorflow():
    """Flags belong to the commands: importing the modules that hold them
    defines none (leo_tf.regression takes the same names) and imports no
    TensorFlow, so flag errors are reported before it loads."""
    script = (
        "import sys\n"
        "from absl import flags\n"
        "from leo_tf import config, export, train\n"
        "from leo_tf.regression import config as regression\n"
        "names = ('num_latents', 'export_dir', 'seed')\n"
        "print(sorted(name for name in names if name in flags.FLAGS))\n"
        "print('tensorflow' in sys.modules)\n"
    )
    completed = run_fixtures.run_python(script, timeout=60, check=True)
    assert completed.stdout.split("\n")[:2] == ["[]", "False"]
