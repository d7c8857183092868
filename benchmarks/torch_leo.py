"""An equivalent LEO meta-training step in PyTorch eager mode (benchmark only).

The same equations as `leo_tf.model`, vectorised over the meta-batch like
leo_tf and with the same split first relation layer, written
the way a PyTorch user would: both inner loops differentiate the summed
support loss with `torch.autograd.grad(create_graph=True)` (second order),
random numbers are drawn inside the step, and `torch.optim.Adam` applies the
NaN-guarded, per-tensor clipped gradients.
"""

import math

import torch
import torch.nn.functional as F


def _glorot(fan_in, fan_out, generator):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.nn.Parameter(
        (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * limit
    )


class TorchLEO(torch.nn.Module):
    """LEO over a meta-batch: inputs [B, N, K, D] / [B, N, V, D]."""

    def __init__(self, config, embedding_dim, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        latents, dim = config.num_latents, embedding_dim
        self.config = config
        self.encoder = _glorot(dim, latents, generator)
        self.relation = torch.nn.ParameterList(
            [_glorot(2 * latents, 2 * latents, generator) for _ in range(3)]
        )
        self.decoder = _glorot(latents, 2 * dim, generator)
        self.inner_lr = torch.nn.Parameter(torch.full((latents,), config.inner_lr_init))
        self.finetuning_lr = torch.nn.Parameter(
            torch.full((dim,), config.finetuning_lr_init)
        )

    def weight_matrices(self):
        return [self.encoder, *self.relation, self.decoder]

    def _dropout(self, x):
        return F.dropout(x, self.config.dropout_rate, training=self.training)

    @staticmethod
    def _gaussian(params, offset):
        loc, pre = params.chunk(2, dim=-1)
        return loc, torch.clamp(torch.expm1(pre) + offset, min=1e-10)

    def _predict(self, inputs, weights):
        batch, classes, count, dim = inputs.shape
        logits = self._dropout(inputs).reshape(batch, classes * count, dim) @ (
            weights.mean(2).transpose(1, 2)
        )
        return logits.reshape(batch, classes, count, classes)

    def _support_loss(self, tr_input, tr_labels, weights):
        logits = self._predict(tr_input, weights)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tr_labels.reshape(-1), reduction="sum"
        )

    def _sample(self, loc, scale):
        """Reparameterised sample in training, the mean in evaluation."""
        if not self.training:
            return loc, None
        noise = torch.randn_like(loc)
        return loc + scale * noise, noise

    def _decode_sample(self, latents, offset):
        return self._sample(*self._gaussian(latents @ self.decoder, offset))[0]

    def forward(self, tr_input, tr_labels, val_input, val_labels):
        """Returns (meta-batch loss, query logits [B, N, V, N])."""
        config = self.config
        batch, classes, shots, dim = tr_input.shape
        codes = self._dropout(tr_input) @ self.encoder
        flat = codes.reshape(batch, classes * shots, -1)
        width = flat.shape[-1]
        first, second, third = self.relation
        hidden = torch.relu(
            (flat @ first[:width])[:, :, None] + (flat @ first[width:])[:, None]
        )
        hidden = torch.relu(hidden @ second)
        related = (hidden.mean(2) @ third).reshape(batch, classes, shots, -1)
        related = related.mean(2, keepdim=True).expand_as(related)
        loc, scale = self._gaussian(related, 0.0)
        latents, noise = self._sample(loc, scale)
        if self.training:
            kl = (-0.5 * noise**2 - torch.log(scale) + 0.5 * latents**2).mean()
        else:
            latents = latents.detach().requires_grad_()  # for the inner loops
            kl = 0.0

        offset = math.sqrt(2.0 / (dim + classes))
        adapted = latents
        for _ in range(config.inner_unroll_length):
            loss = self._support_loss(
                tr_input, tr_labels, self._decode_sample(adapted, offset)
            )
            (gradient,) = torch.autograd.grad(loss, adapted, create_graph=self.training)
            adapted = adapted - self.inner_lr * gradient
        weights = self._decode_sample(adapted, offset)
        for _ in range(config.finetuning_unroll_length):
            loss = self._support_loss(tr_input, tr_labels, weights)
            (gradient,) = torch.autograd.grad(loss, weights, create_graph=self.training)
            weights = weights - self.finetuning_lr * gradient
        logits = self._predict(val_input, weights)
        query_loss = F.cross_entropy(
            logits.reshape(-1, classes), val_labels.reshape(-1)
        )
        penalty = ((latents - adapted.detach()) ** 2).mean()
        l2 = sum((w**2).sum() / 2 for w in self.weight_matrices())
        norms = self.decoder.norm(dim=1, keepdim=True) + 1e-32
        cosine = (self.decoder @ self.decoder.T) / (norms @ norms.T)
        orthogonality = ((cosine - torch.eye(cosine.shape[0])) ** 2).mean()
        loss = (
            query_loss
            + config.kl_weight * kl
            + config.encoder_penalty_weight * penalty
            + config.l2_penalty_weight * l2
            + config.orthogonality_penalty_weight * orthogonality
        )
        return loss, logits


def make_train_step(model, optimizer_config):
    """(tr_input, tr_labels, val_input, val_labels) -> loss, one Adam update."""
    optimizer = torch.optim.Adam(
        model.parameters(), lr=optimizer_config.outer_lr, eps=1e-8
    )
    decayed = {id(w) for w in model.weight_matrices()}

    def step(tr_input, tr_labels, val_input, val_labels):
        optimizer.zero_grad(set_to_none=False)
        loss, _ = model(tr_input, tr_labels, val_input, val_labels)
        loss.backward()
        with torch.no_grad():
            parameters = list(model.parameters())
            fired = not torch.isfinite(loss) or any(
                torch.isnan(p.grad).any() for p in parameters
            )
            for parameter in parameters:
                if fired:
                    if id(parameter) in decayed:
                        parameter.grad.copy_(1e-4 * parameter)
                    else:
                        parameter.grad.zero_()
                parameter.grad.clamp_(
                    -optimizer_config.gradient_threshold,
                    optimizer_config.gradient_threshold,
                )
                norm = parameter.grad.norm()
                if norm > optimizer_config.gradient_norm_threshold:
                    parameter.grad.mul_(optimizer_config.gradient_norm_threshold / norm)
        optimizer.step()
        return loss

    return step


def make_eval_step(model):
    """Deterministic adaptation (means, no dropout) -> query accuracy [B]."""
    model.eval()

    def step(tr_input, tr_labels, val_input, val_labels):
        _, logits = model(tr_input, tr_labels, val_input, val_labels)
        with torch.no_grad():
            return (logits.argmax(-1) == val_labels).float().mean((1, 2))

    return step
