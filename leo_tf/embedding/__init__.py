"""Making LEO's embedding pickles from images.

The LEO authors never released the code that produced their embeddings. This
package trains a feature extractor by ordinary supervised classification on
the meta-train classes only and writes train/val/test embedding pickles in the
format `leo_tf.data.embeddings` reads. Modules, one job each:

    images.py     image sources (packed Omniglot arrays, a folder of class
                  folders through TFDS' ImageFolder, a registered TFDS data
                  set) -> `ImageSet`: images uint8 [n, H, W, C] + class names
    splits.py     class-level meta-train / meta-validation / meta-test split
                  (Omniglot standard or seeded random), optional rotations
    backbones.py  Keras feature extractors: conv4 (default) and WRN-28-10
    pretrain.py   supervised training of backbone + linear softmax head,
                  feature extraction in inference mode
    episodic.py   optional episodic fine-tuning of the feature extractor
                  (prototypical loss, cosine similarity, learned scale)
    writer.py     class ids, keys and atomic pickle / classes.json writing
    pipeline.py   the whole run: source -> split -> train -> embed -> write
    options.py    its configuration: the flags of `leo_tf.embed` (no TensorFlow)

The command line is `python -m leo_tf.embed` (leo_tf/embed.py).
"""
