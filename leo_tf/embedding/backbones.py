"""Keras feature extractors: images -> embeddings [B, D].

* `conv4` (default, for small images such as Omniglot's 28x28): four blocks
    of conv3x3(filters, no bias) -> batch norm -> ReLU -> 2x2 max pool, then
    flatten. D = filters * floor(H/16) * floor(W/16): 64 for 28x28 inputs with
    the default 64 filters (the last feature map is 1x1), 1600 at 84x84.
* `wide_resnet` (the LEO paper's WRN-28-10, for 84x84 images): a 3x3 conv
    with 16 filters, then three groups of (depth - 4) / 6 pre-activation basic
    blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut) of width
    16k, 32k, 64k with strides 1, 2, 2, then BN-ReLU and global average
    pooling. D = 64 * width: 640 for WRN-28-10.

Both take float32 [B, H, W, C] inputs that are already normalised (see
`pretrain.build_feature_extractor`) and end after a ReLU and pooling, so
their features are non-negative.
"""

import keras

from leo_tf.embedding.options import BACKBONES, CONV4_MIN_IMAGE_SIZE

_WEIGHT_INIT = "he_normal"


def _conv(filters: int, size: int, name: str, stride: int = 1) -> keras.layers.Conv2D:
    """A bias-free, He-initialised, "same"-padded square convolution."""
    return keras.layers.Conv2D(
        filters,
        size,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=_WEIGHT_INIT,
        name=name,
    )


def conv4(input_shape, filters: int = 64, name: str = "conv4") -> keras.Model:
    """The 4-block conv net of the few-shot literature.

    Args:
      input_shape: (H, W, C).
      filters: channels of every block.
      name: model name.

    Returns:
      Keras model float32 [B, H, W, C] -> [B, filters * (H//16) * (W//16)].
    """
    height, width = input_shape[:2]
    if min(height, width) < CONV4_MIN_IMAGE_SIZE:
        raise ValueError(
            f"conv4 needs images of at least {CONV4_MIN_IMAGE_SIZE}x"
            f"{CONV4_MIN_IMAGE_SIZE}, found {height}x{width}"
        )
    inputs = keras.Input(shape=tuple(input_shape))
    x = inputs
    for block in range(4):
        x = _conv(filters, 3, f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    outputs = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs, outputs, name=name)


def _wrn_block(x, filters: int, stride: int, dropout_rate: float, name: str):
    """One pre-activation basic block: [B, H, W, C] -> [B, H/s, W/s, filters]."""
    pre = keras.layers.BatchNormalization(name=f"{name}_bn1")(x)
    pre = keras.layers.ReLU(name=f"{name}_relu1")(pre)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, f"{name}_shortcut", stride)(pre)
    else:
        shortcut = x
    y = _conv(filters, 3, f"{name}_conv1", stride)(pre)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    y = keras.layers.ReLU(name=f"{name}_relu2")(y)
    if dropout_rate:
        y = keras.layers.Dropout(dropout_rate, name=f"{name}_dropout")(y)
    y = _conv(filters, 3, f"{name}_conv2")(y)
    return keras.layers.Add(name=f"{name}_add")([shortcut, y])


def wide_resnet(
    input_shape,
    depth: int = 28,
    width: int = 10,
    dropout_rate: float = 0.0,
    name: str = "wrn",
) -> keras.Model:
    """Wide residual network WRN-depth-width (Zagoruyko & Komodakis 2016).

    Args:
      input_shape: (H, W, C), e.g. (84, 84, 3).
      depth: total conv depth; (depth - 4) must be divisible by 6.
      width: widening factor k.
      dropout_rate: dropout between the two convs of each block.
      name: model name.

    Returns:
      Keras model float32 [B, H, W, C] -> [B, 64 * width].
    """
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, found {depth}")
    blocks_per_group = (depth - 4) // 6
    inputs = keras.Input(shape=tuple(input_shape))
    x = _conv(16, 3, "stem")(inputs)
    for group, (filters, stride) in enumerate(
        ((16 * width, 1), (32 * width, 2), (64 * width, 2))
    ):
        for block in range(blocks_per_group):
            x = _wrn_block(
                x,
                filters,
                stride if block == 0 else 1,
                dropout_rate,
                name=f"group{group}_block{block}",
            )
    x = keras.layers.BatchNormalization(name="final_bn")(x)
    x = keras.layers.ReLU(name="final_relu")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, outputs, name=name)


def build_backbone(
    name: str,
    input_shape,
    conv_filters: int = 64,
    wrn_depth: int = 28,
    wrn_width: int = 10,
) -> keras.Model:
    """The backbone called `name` (one of BACKBONES) for `input_shape`."""
    if name == "conv4":
        return conv4(input_shape, conv_filters)
    if name == "wrn":
        return wide_resnet(input_shape, wrn_depth, wrn_width)
    raise ValueError(f"--backbone: expected one of {BACKBONES}, found {name!r}")
