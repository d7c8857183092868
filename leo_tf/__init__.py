"""leo_tf: Meta-Learning with Latent Embedding Optimization in TensorFlow 2."""

__version__ = "0.1.0"
