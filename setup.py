"""Packaging for leo_tf: LEO (Rusu et al., ICLR 2019) in TensorFlow 2 / Keras."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name="leo_tf",
    version="0.1.0",
    description=(
        "Meta-Learning with Latent Embedding Optimization (LEO) in "
        "TensorFlow 2 / Keras"
    ),
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["leo_tf", "leo_tf.*"]),
    install_requires=[
        "tensorflow>=2.16,<3",
        "tensorflow-probability[tf]>=0.24,<1",
        "tensorflow-datasets>=4.9,<5",
        # TFDS needs it to download a data set (leo_tf.embed --tfds_name).
        "importlib_resources>=5",
        # TensorFlow no longer installs TensorBoard; summaries need it.
        "tensorboard>=2.16,<3",
        "absl-py>=1.4,<3",
        "numpy>=1.23,<3",
    ],
    extras_require={
        "test": ["pytest>=7,<10", "matplotlib>=3.5,<4"],
        # The regression figure (python -m leo_tf.regression).
        "plots": ["matplotlib>=3.5,<4"],
        # The benchmark's PyTorch variant (benchmarks/bench_step.py).
        "bench": ["torch>=2.0"],
    },
    entry_points={
        "console_scripts": [
            "leo-train=leo_tf.train:run",
            "leo-export=leo_tf.export:run",
            "leo-embed=leo_tf.embed:run",
            "leo-search=leo_tf.search:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
