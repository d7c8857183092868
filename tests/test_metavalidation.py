"""Meta-validation batches: new at every checkpoint (authors), or fixed."""

import pytest

from leo_tf import trainer
from leo_tf.data import episodes as episodes_lib
from tests import run_fixtures

METAVALID_BATCH_SIZE = 20  # run_fixtures' toy runs; training uses 4, test 50


def _validation_batches(monkeypatch, data_path, tmp_path, **train):
    """Trains a toy run; returns the meta-validation batch indices drawn."""
    drawn = []
    original = episodes_lib.EpisodeSampler.sample_indices

    def sample_indices(self, step):
        if self.batch_size == METAVALID_BATCH_SIZE:
            drawn.append(step)
        return original(self, step)

    monkeypatch.setattr(episodes_lib.EpisodeSampler, "sample_indices", sample_indices)
    config = run_fixtures.toy_run_config(
        data_path,
        tmp_path / "run",
        num_steps_limit=4,
        checkpoint_steps=2,
        summary_steps=2,
        **train,
    )
    trainer.train(config)
    return drawn


@pytest.mark.slow
def test_each_checkpoint_validates_on_new_batches_by_default(
    monkeypatch, toy_data, tmp_path
):
    drawn = _validation_batches(monkeypatch, toy_data, tmp_path)
    # 10 batches at step 2, 10 others at step 4: a pure function of the step,
    # so a resumed run draws the same ones.
    assert drawn == list(range(20, 30)) + list(range(40, 50))


@pytest.mark.slow
def test_fixed_metavalid_batches_reuses_the_same_batches(
    monkeypatch, toy_data, tmp_path
):
    drawn = _validation_batches(
        monkeypatch, toy_data, tmp_path, fixed_metavalid_batches=True
    )
    assert drawn == list(range(10)) * 2
