"""leo_tf: Meta-Learning with Latent Embedding Optimization in TensorFlow 2.

Importing leo_tf before TensorFlow turns on TensorFlow's oneDNN CPU kernels
(`TF_ENABLE_ONEDNN_OPTS=1`) unless that variable is already set. TensorFlow
reads it once, when it is imported, and by default enables oneDNN only on
CPUs with AVX-512-class features; elsewhere its Eigen kernels, compiled for
AVX without FMA, run LEO's largest matmuls (the relation network's) at half
the speed of oneDNN's, which picks the CPU's best instructions at run time.
Results differ from Eigen's at the level of float32 rounding. Set
`TF_ENABLE_ONEDNN_OPTS=0` to keep TensorFlow's default. See BUILD.md,
Performance.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
