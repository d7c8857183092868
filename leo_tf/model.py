"""LEO: Latent Embedding Optimization (Rusu et al., ICLR 2019, Section 3).

A meta-batch of B independent N-way K-shot episodes is processed at once;
every tensor carries the batch axis first. Shapes: support `[B, N, K, D]`,
query `[B, N, V, D]`, latent codes `[B, N, K, L]`, class weights `[B, N, D]`.

Class weights: as in the paper, every latent code z[n, k] is decoded into
(and, in meta-training, sampled as) classifier weights w[n, k], but the
classifier uses only their class mean c[n] = mean_k w[n, k] (its logits are
mean_k <x, w[n, k]> = <x, c[n]>), and finetuning moves the K weights of a
class alike, so the model carries c `[B, N, D]` instead of w `[B, N, K, D]`.

Meta-training and evaluation differ in one place only: the `EpisodeNoise`
passed in. With noise (meta-training), inputs are dropped out with its masks
and the latent codes and classifier weights are reparameterised samples of
their Gaussians; without it (evaluation), there is no dropout, the samples
are the means, and the KL term and encoder penalty are zero.
"""

from typing import NamedTuple

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from leo_tf import layers, runtime
from leo_tf.noise import EpisodeNoise

tfd = tfp.distributions

_MIN_STDDEV = 1e-10
_NO_NOISE = EpisodeNoise(None, None, None, None, None)


class EpisodeOutputs(NamedTuple):
    """Per-episode results of one forward pass."""

    loss: tf.Tensor  # [B] query CE + kl_weight KL + gamma penalty
    query_loss: tf.Tensor  # [B] mean query cross-entropy
    accuracy: tf.Tensor  # [B] fraction of query examples right
    kl: tf.Tensor  # [B] single-sample KL estimate (0 in eval)
    encoder_penalty: tf.Tensor  # [B] ||z - stop_gradient(z')||^2 mean (0 in eval)
    latents: tf.Tensor  # [B, N, K, L] codes before adaptation
    logits: tf.Tensor  # [B, N, V, N] query logits


class Adaptation(NamedTuple):
    """What adapting to a support set produces."""

    latent_distribution: tfd.Normal  # over [B, N, K, L]
    latents: tf.Tensor  # [B, N, K, L] sampled (or mean) initial codes
    adapted_latents: tf.Tensor  # [B, N, K, L] after the latent inner loop
    class_weights: tf.Tensor  # [B, N, D] mean_k w[n, k] after finetuning


class MetaBatchLoss(NamedTuple):
    """The meta-training objective and its parts."""

    total: tf.Tensor  # scalar, what the outer loop minimises
    episodes: EpisodeOutputs
    l2: tf.Tensor  # scalar, sum over weight matrices of sum(w^2)/2
    orthogonality: tf.Tensor  # scalar, decoder orthogonality penalty
    # Scalars whose sum is `total` (up to rounding): each tower's share of the
    # mean episode loss, then the weighted penalties. Each depends on its own
    # ops, so their gradients can be taken one by one (steps._scaled_gradients).
    terms: tuple


def gaussian(parameters):
    """The Normal over latent codes parameterised by `parameters: [..., 2M]`.

    The first half is the mean, the second, u, gives the stddev
    `latent_stddev(u)`; the Normal is over `[..., M]`.
    """
    loc, pre_stddev = tf.split(parameters, 2, axis=-1)
    return tfd.Normal(loc=loc, scale=latent_stddev(pre_stddev))


def latent_stddev(pre_stddev):
    """max(exp(u) - 1, 1e-10), elementwise, with exp(u) - 1 taken as expm1(u).

    expm1 keeps every digit of a small stddev near u = 0, where exp(u) - 1
    cancels; the latent codes' log-stddev enters the KL term.
    """
    return _floored(tf.math.expm1(pre_stddev))


def weight_stddev(pre_stddev, stddev_offset):
    """max(exp(u) - (1 - stddev_offset), 1e-10), elementwise, as the authors.

    For the classifier weights, whose stddev only scales their noise: the
    subtraction's rounding error (at most one ulp of 1) is far below the
    weights' own spread, and the gradient of exp reuses its output, where
    expm1's computes an exp again (1.3x faster on the 5-shot decode).
    """
    return _floored(tf.exp(pre_stddev) - (1.0 - stddev_offset))


def _floored(stddev):
    """max(stddev, 1e-10), written relu(stddev - 1e-10) + 1e-10.

    Equal up to one rounding; the gradient of relu is one ReluGrad op, where
    that of tf.maximum is a comparison and two selects.
    """
    return tf.nn.relu(stddev - _MIN_STDDEV) + _MIN_STDDEV


def sample(distribution, standard_noise):
    """Reparameterised sample loc + scale * noise; the mean when noise is None."""
    if standard_noise is None:
        return distribution.mean()
    return distribution.loc + distribution.scale * standard_noise


def kl_estimate(distribution, standard_noise, samples):
    """Single-sample estimate of KL(q || N(0, I)) per episode.

    Mean over the elements of log q(z) - log N(z; 0, 1) at the sample z, as in
    the authors' code. log q(z) is evaluated through the standardised noise e,
    z = loc + scale * e: log q(z) = log N(e; 0, 1) - log(scale). This equals
    `distribution.log_prob(z)` in exact arithmetic, but the latter recomputes
    e = (z - loc) / scale, which in float32 cancels catastrophically where
    scale sits at its 1e-10 floor (z rounds to loc, losing the -e^2/2 term).

    Args:
      distribution: Normal over [B, ...].
      standard_noise: e, [B, ...].
      samples: z, [B, ...].

    Returns:
      [B].
    """
    standard = tfd.Normal(
        loc=tf.zeros([], samples.dtype), scale=tf.ones([], samples.dtype)
    )
    log_q = standard.log_prob(standard_noise) - tf.math.log(distribution.scale)
    log_prior = standard.log_prob(samples)
    return _mean_per_episode(log_q - log_prior)


def softmax_cross_entropy(labels, logits):
    """Softmax cross-entropy `[...]` of int labels `[...]` and logits `[..., N]`.

    log sum_n exp(s_n) - s_label with s = logits - max_n logits: the value of
    tf.nn.sparse_softmax_cross_entropy_with_logits (which also shifts by the
    max; the shift cancels, so it is held constant for the gradient), whose
    CPU kernel takes twice as long on LEO's few-class logits (the V=599
    evaluation's [2995, 5] per episode).
    """
    shifted = logits - tf.stop_gradient(tf.reduce_max(logits, -1, keepdims=True))
    label_logits = tf.gather(shifted, labels, batch_dims=len(labels.shape))
    return tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=-1)) - label_logits


def _mean_per_episode(values):
    """[B, ...] -> [B]."""
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _per_episode_matmul(a, b, episode_matmul=tf.matmul, **kwargs):
    """tf.matmul of [B, ...] tensors, as one 2-D matmul per episode on CPUs.

    On CPU, TensorFlow's batched matmul is several times slower than separate
    2-D MatMuls for LEO's shapes, which have few columns (N classes): 5x for
    the V=599 evaluation's query logits; and separate MatMuls also spread
    over the inter-op threads. GPUs, and a batch of unknown size (serving),
    use one batched matmul.

    Args:
      a, b: [B, ...] operands.
      episode_matmul: the 2-D matmul of one episode's operands, taking
        `**kwargs`: tf.matmul or `_row_blocked_matmul`.
      **kwargs: tf.matmul's transpose_a, transpose_b (only transpose_b with
        `_row_blocked_matmul`).
    """
    if a.shape[0] is None or not runtime.unbatched_matmuls():
        return tf.matmul(a, b, **kwargs)
    return tf.stack(
        [episode_matmul(x, y, **kwargs) for x, y in zip(tf.unstack(a), tf.unstack(b))]
    )


_MAX_BLOCK_ROWS = 1024


def _row_blocked_matmul(a, b, transpose_b=False):
    """tf.matmul of a 2-D `a` [R, X] and `b`, in blocks of the rows of `a`.

    The rows of a product are independent, (A B)[rows] = A[rows] B, so
    R > 1024 rows are cut into ceil(R / 1024) blocks of near-equal size, one
    MatMul each, and the results concatenated; up to 1024 rows (the query
    sets of the paper's meta-training) are one MatMul. On CPU, oneDNN takes
    the V=599 evaluation's query logits, [2995, 640] x [640, 5] per episode,
    14% faster in three blocks than whole (1.65 against 1.91 ms on one
    thread); the whole evaluation step runs 1.1-1.2x faster (BUILD.md).
    `a` is never transposed: its rows are the product's rows.
    """
    rows = a.shape[0]
    if rows is None or rows <= _MAX_BLOCK_ROWS:
        return tf.matmul(a, b, transpose_b=transpose_b)
    count = -(-rows // _MAX_BLOCK_ROWS)
    sizes = [rows // count + (i < rows % count) for i in range(count)]
    blocks = tf.split(a, sizes)
    return tf.concat([tf.matmul(x, b, transpose_b=transpose_b) for x in blocks], 0)


def _flatten_examples(values):
    """[B, N, M, X] -> [B, N * M, X]."""
    shape = tf.shape(values)
    return tf.reshape(values, [shape[0], shape[1] * shape[2], shape[3]])


def meta_batch_part(episodes, noise, index, num_parts):
    """Part `index` (int or int tensor) of a meta-batch cut in equal parts.

    Returns (episodes, noise) of B / num_parts episodes; noise may be None.
    The noise's `weights` and `support_dropout` carry a leading step axis
    ([steps, B, ...]); the part's are tuples of per-step [B / num_parts, ...]
    tensors. Slicing every step along its leading (batch) axis takes views of
    contiguous memory, whereas slicing the stack along its second axis
    copies it: on CPU that copy cost a fifth of the 5-shot training step.
    """
    size = tf.shape(episodes.tr_input)[0] // num_parts
    begin, end = index * size, (index + 1) * size
    part = type(episodes)(*(x[begin:end] for x in episodes))
    if noise is None:
        return part, None

    def per_step(stack):
        return tuple(x[begin:end] for x in tf.unstack(stack))

    return part, noise._replace(
        encoder_dropout=noise.encoder_dropout[begin:end],
        latent=noise.latent[begin:end],
        weights=per_step(noise.weights),
        support_dropout=per_step(noise.support_dropout),
        query_dropout=noise.query_dropout[begin:end],
    )


def _concatenated(towers):
    """One EpisodeOutputs of the towers' EpisodeOutputs, in their order."""
    return EpisodeOutputs(*(tf.concat(parts, 0) for parts in zip(*towers)))


def _pick(stack, index):
    """stack[index], or None where there is no noise (evaluation)."""
    return None if stack is None else stack[index]


class LEO(keras.layers.Layer):
    """The LEO model; see the module docstring for shapes and modes."""

    def __init__(
        self, config, embedding_dim, seed=None, dtype="float32", name="leo", **kwargs
    ):
        """Creates and builds the model.

        Args:
          config: ModelConfig.
          embedding_dim: D, the width of the input embeddings.
          seed: int seed of the weight initialisers, or None.
          dtype: "float32" (default, as the authors) or "float64".
          name: layer name.
          **kwargs: other keras.layers.Layer arguments.
        """
        super().__init__(dtype=dtype, name=name, **kwargs)
        self.config = config
        self.embedding_dim = embedding_dim
        self.seed = seed
        num_latents = config.num_latents
        self.encoder = layers.Encoder(
            num_latents, seed=seed, dtype=dtype, name="encoder"
        )
        self.relation_network = layers.RelationNetwork(
            seed=None if seed is None else seed + 1,
            dtype=dtype,
            name="relation_network",
        )
        self.decoder = layers.Decoder(
            embedding_dim,
            seed=None if seed is None else seed + 10,
            dtype=dtype,
            name="decoder",
        )
        self.encoder.build((None, None, None, embedding_dim))
        self.relation_network.build((None, None, None, num_latents))
        self.decoder.build((None, None, None, num_latents))
        self.inner_lr = self.add_weight(
            name="inner_lr",
            shape=(num_latents,),
            initializer=keras.initializers.Constant(config.inner_lr_init),
        )
        self.finetuning_lr = self.add_weight(
            name="finetuning_lr",
            shape=(embedding_dim,),
            initializer=keras.initializers.Constant(config.finetuning_lr_init),
        )
        self.built = True

    @property
    def weight_matrices(self):
        """The kernels that the L2 penalty covers (not the learning rates)."""
        return layers.network_kernels(self.encoder, self.relation_network, self.decoder)

    # Section 3.1: encoding the support set into a distribution over codes.
    def encode(self, tr_input, dropout_mask=None):
        """tr_input: [B, N, K, D] -> Normal over latent codes [B, N, K, L]."""
        codes = self.encoder(tr_input, dropout_mask)
        return gaussian(self.relation_network(codes))

    # Section 3.1: decoding codes into classifier weights, and sampling them.
    def decode(self, latents, standard_noise=None, decoder_halves=None):
        """Class weights c[n] = mean_k w[n, k] of the weights decoded from codes.

        Each code z[n, k] gives a Normal over w[n, k] with loc[n, k] = z W_mu
        and scale[n, k] = max(exp(z W_u) - (1 - offset), 1e-10) (W_mu, W_u the
        decoder's halves), sampled w = loc + scale * eps in meta-training and
        w = loc in evaluation. The loc is linear in z, so
          mean_k w[n, k] = (mean_k z[n, k]) W_mu + mean_k scale[n, k] eps[n, k]:
        the mean half of the decoder runs once per class on the class-mean code,
        and the stddev half, on every code, only in meta-training.

        The stddev offset sqrt(2 / (D + N)) is the Glorot scale of an N-way
        classifier on D inputs, as in the authors' code.

        Args:
          latents: [B, N, K, L] codes z.
          standard_noise: [B, N, K, D] standard normal eps (meta-training), or
            None for the means (evaluation).
          decoder_halves: `self.decoder.kernel_halves()`, split once for all
            the decodes of a step, or None to split here.

        Returns:
          [B, N, D] class weights.
        """
        class_loc = self.decoder.loc(
            layers.mean_along(latents, axis=2), decoder_halves
        )  # [B, N, D]
        if standard_noise is None:
            return class_loc
        num_classes = tf.cast(tf.shape(latents)[1], self.compute_dtype)
        offset = tf.sqrt(2.0 / (self.embedding_dim + num_classes))
        pre_stddev = self.decoder.pre_stddev(latents, decoder_halves)
        scale = weight_stddev(pre_stddev, offset)  # [B, N, K, D]
        # The sampled w[n, k] = loc[n, k] + scale[n, k] eps[n, k] are only
        # needed through their class mean, which is (see above)
        #   c[n] = mean_k loc[n, k] + mean_k scale[n, k] eps[n, k],
        # so the class-mean loc is added once per class, not broadcast over k.
        return class_loc + layers.mean_along(scale * standard_noise, axis=2)

    def predict(self, inputs, class_weights, dropout_mask=None):
        """Classifier logits.

        logit(x, n) = mean_k <x, w[n, k]> = <x, c[n]>, with the class weights
        c[n] = mean_k w[n, k] formed before (see `decode`).

        Args:
          inputs: [B, G, M, D] examples in G groups of M (the N classes'
            K or V examples of an episode, or any grouping).
          class_weights: [B, N, D].
          dropout_mask: [B, G, M, D] or None.

        Returns:
          [B, G, M, N] logits.
        """
        inputs = layers.apply_dropout(inputs, dropout_mask)
        logits = _per_episode_matmul(
            _flatten_examples(inputs),
            class_weights,
            episode_matmul=_row_blocked_matmul,
            transpose_b=True,
        )  # [B, GM, N]
        shape = tf.concat([tf.shape(inputs)[:3], tf.shape(class_weights)[1:2]], 0)
        return tf.reshape(logits, shape)

    def support_loss_gradient(
        self, tr_input, tr_onehot, class_weights, dropout_mask=None
    ):
        """d/dc of the SUM over support examples of the softmax cross-entropy.

        Closed form: d CE / d logits = softmax(logits) - onehot(label), and
        logits = x . c[n], so d/dc[n] = sum_x (p - y)_n x. The authors
        differentiate w.r.t. each of the K weights w[n, k] of which c[n] is the
        mean: that gradient is d/dc[n] / K, the same for every k (see
        `finetuning_inner_loop`). The outer tape differentiates through this
        expression, so second-order gradients stay exact.

        Args:
          tr_input: [B, N, K, D].
          tr_onehot: [B, N, K, N] one-hot labels.
          class_weights: [B, N, D].
          dropout_mask: [B, N, K, D] or None.

        Returns:
          [B, N, D].
        """
        inputs = layers.apply_dropout(tr_input, dropout_mask)
        logits = self.predict(inputs, class_weights)
        residual = tf.nn.softmax(logits) - tr_onehot  # [B, N, K, N]
        return _per_episode_matmul(
            _flatten_examples(residual), _flatten_examples(inputs), transpose_a=True
        )  # [B, N, D]

    # Section 3.2: adaptation in latent space.
    def leo_inner_loop(self, tr_input, tr_onehot, latents, noise, decoder_halves=None):
        """S steps of z <- z - inner_lr * dL_tr/dz; returns adapted [B, N, K, L].

        L_tr is the summed support loss of the class weights decoded (and, in
        meta-training, re-sampled) from the current z; each step's gradient is
        the closed-form dL_tr/dc carried back to z by a tape over the decoder.
        decoder_halves: as in `decode`.
        """
        for step in range(self.config.inner_unroll_length):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(latents)
                class_weights = self.decode(
                    latents, _pick(noise.weights, step), decoder_halves
                )
            class_gradient = self.support_loss_gradient(
                tr_input, tr_onehot, class_weights, _pick(noise.support_dropout, step)
            )
            latent_gradient = tape.gradient(
                class_weights, latents, output_gradients=class_gradient
            )
            latents = latents - self.inner_lr * latent_gradient
        return latents

    # Section 3.3: fine-tuning the decoded weights in parameter space.
    def finetuning_inner_loop(self, tr_input, tr_onehot, class_weights, noise):
        """F steps of w <- w - finetuning_lr * dL_tr/dw; returns c [B, N, D].

        Every one of the K weights w[n, k] of class n has the gradient
        dL_tr/dw[n, k] = dL_tr/dc[n] / K, so each, and hence their mean c[n],
        moves by finetuning_lr * dL_tr/dc[n] / K.
        """
        num_shots = tf.cast(tf.shape(tr_input)[2], self.compute_dtype)
        first = self.config.inner_unroll_length
        for step in range(self.config.finetuning_unroll_length):
            class_gradient = self.support_loss_gradient(
                tr_input,
                tr_onehot,
                class_weights,
                _pick(noise.support_dropout, first + step),
            )
            class_weights = class_weights - self.finetuning_lr * (
                class_gradient / num_shots
            )
        return class_weights

    def adapt(self, tr_input, tr_output, noise=_NO_NOISE):
        """Encodes the support set, adapts in latent space, then finetunes.

        Args:
          tr_input: [B, N, K, D] support examples.
          tr_output: [B, N, K, 1] int labels.
          noise: EpisodeNoise (meta-training) or _NO_NOISE (evaluation).

        Returns:
          Adaptation: the latent distribution, its sample [B, N, K, L], the
          adapted latents [B, N, K, L] and finetuned class weights [B, N, D].
        """
        tr_input = tf.cast(tr_input, self.compute_dtype)
        num_classes = tf.shape(tr_input)[1]
        tr_onehot = tf.one_hot(tr_output[..., 0], num_classes, dtype=self.compute_dtype)
        latent_distribution = self.encode(tr_input, noise.encoder_dropout)
        latents = sample(latent_distribution, noise.latent)
        decoder_halves = self.decoder.kernel_halves()
        adapted = self.leo_inner_loop(
            tr_input, tr_onehot, latents, noise, decoder_halves
        )
        class_weights = self.decode(
            adapted,
            _pick(noise.weights, self.config.inner_unroll_length),
            decoder_halves,
        )
        class_weights = self.finetuning_inner_loop(
            tr_input, tr_onehot, class_weights, noise
        )
        return Adaptation(latent_distribution, latents, adapted, class_weights)

    def run_episodes(self, episodes, noise=None, num_towers=1):
        """Adapts to each episode's support set and scores its query set.

        Args:
          episodes: tr_input [B, N, K, D], tr_output [B, N, K, 1] int,
            val_input [B, N, V, D], val_output [B, N, V, 1] int.
          noise: EpisodeNoise for meta-training; None for evaluation.
          num_towers: see `run_towers`. The results are those of one tower.

        Returns:
          EpisodeOutputs.
        """
        return _concatenated(self.run_towers(episodes, noise, num_towers))

    def run_towers(self, episodes, noise=None, num_towers=1):
        """`run_episodes` on each of num_towers equal parts of the meta-batch.

        The parts' ops are independent, so a CPU's inter-op threads compute
        them side by side; B must be a multiple of num_towers.

        Returns:
          A list of num_towers EpisodeOutputs, of B / num_towers episodes
          each, in the meta-batch's order.
        """
        if num_towers == 1:
            return [self._run_tower(episodes, noise)]
        return [
            self._run_tower(*meta_batch_part(episodes, noise, i, num_towers))
            for i in range(num_towers)
        ]

    def _run_tower(self, episodes, noise):
        """`run_episodes` of one tower: all of `episodes`, as one batch."""
        training = noise is not None
        noise = noise or _NO_NOISE
        val_input = tf.cast(episodes.val_input, self.compute_dtype)
        adaptation = self.adapt(episodes.tr_input, episodes.tr_output, noise)
        latent_distribution, latents, adapted, class_weights = adaptation

        logits = self.predict(val_input, class_weights, noise.query_dropout)
        labels = episodes.val_output[..., 0]
        query_loss = _mean_per_episode(softmax_cross_entropy(labels, logits))
        correct = tf.equal(tf.argmax(logits, axis=-1, output_type=labels.dtype), labels)
        accuracy = _mean_per_episode(tf.cast(correct, self.compute_dtype))

        if training:
            kl = kl_estimate(latent_distribution, noise.latent, latents)
            encoder_penalty = _mean_per_episode(
                tf.square(latents - tf.stop_gradient(adapted))
            )
        else:
            kl = encoder_penalty = tf.zeros_like(query_loss)
        loss = (
            query_loss
            + self.config.kl_weight * kl
            + self.config.encoder_penalty_weight * encoder_penalty
        )
        return EpisodeOutputs(
            loss=loss,
            query_loss=query_loss,
            accuracy=accuracy,
            kl=kl,
            encoder_penalty=encoder_penalty,
            latents=latents,
            logits=logits,
        )

    def l2_penalty(self):
        """Sum over the weight matrices of sum(w^2) / 2 (scalar)."""
        return tf.add_n([tf.nn.l2_loss(w) for w in self.weight_matrices])

    def meta_batch_loss(self, episodes, noise=None, num_towers=1):
        """Mean episode loss plus the L2 and orthogonality penalties.

        num_towers: see `run_towers`.
        """
        towers = self.run_towers(episodes, noise, num_towers)
        outputs = _concatenated(towers)
        l2 = self.l2_penalty()
        orthogonality = self.decoder.orthogonality_penalty()
        penalties = (
            self.config.l2_penalty_weight * l2
            + self.config.orthogonality_penalty_weight * orthogonality
        )
        # mean over the B episodes = sum over towers of (tower's loss sum) / B
        batch_size = tf.cast(tf.shape(outputs.loss)[0], outputs.loss.dtype)
        shares = [tf.reduce_sum(tower.loss) / batch_size for tower in towers]
        return MetaBatchLoss(
            total=tf.reduce_mean(outputs.loss) + penalties,
            episodes=outputs,
            l2=l2,
            orthogonality=orthogonality,
            terms=(*shares, penalties),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_dim": self.embedding_dim,
            "seed": self.seed,
            **vars(self.config),
        }
