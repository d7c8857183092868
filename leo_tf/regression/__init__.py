"""Few-shot 1-D regression with LEO (the paper's Section 5.1), and a MAML baseline.

tasks.py    the task distribution: sinusoids and lines, with noise (NumPy)
mlp.py      the 1-40-40-1 regressor as a function of one flat parameter vector
model.py    LEO generating that regressor's parameters (Keras, TFP)
maml.py     the baseline: a learned initialisation adapted by gradient steps
config.py   the typed configuration and its validation (no TensorFlow)
run.py      meta-training, checkpoints, summaries and held-out evaluation
figure.py   the paper-style figure of sampled LEO predictions (matplotlib)
__main__.py `python -m leo_tf.regression`: the flags and the command line
"""
