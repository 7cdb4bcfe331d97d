"""Per-draw ELBO gradients of the MLP Bernoulli VAE, derived by hand. No I/O, no autograd.

The variance lab (:mod:`pyro_vae.lab.variance`) needs R = 1000 separate gradients per estimator
and checkpoint, not their sum. Automatic differentiation under ``torch.func.vmap`` gives them,
but spends most of its time on elementwise work and temporaries around the matrix products.
For the model the default experiment uses -- MLP encoder and decoder, Bernoulli likelihood on
logits, N(0, I) prior, diagonal Normal q(z|x) with ``scale = softplus(raw) + MIN_SCALE`` -- the
backward pass is short enough to write out, and each layer's per-draw weight gradient becomes
one matrix product:

* decoder layer with input ``a`` (per draw) and output cotangent ``g`` (per draw):
  ``dW[r] = g[r]^T a[r]``, a batched product over draws r;
* encoder layer: its input is the same in every draw (x is fixed), so the R products
  ``g[r]^T a`` are one product ``[g[1]; ...; g[R]]^T a``.

Per image, with ``w = 1 / (batch x particles)`` (gradients are of the per-image loss), the
cotangents of the latent variables are (``eps`` standard normal, ``z = loc + scale * eps``):

* Bernoulli logits ``l``:  dL/dl = w (sigmoid(l) - x);
* ``reparam`` (Trace_ELBO, pathwise):  with ``g_z = dL/dz`` through the decoder plus ``w z``
  from ``-log p(z)``, dL/dloc = g_z and dL/dscale = g_z eps - w / scale (the path through
  ``log q(z|x)`` cancels in loc and leaves ``-1/scale`` in scale);
* ``stl``: log q evaluated with detached parameters, so ``g_z`` gains ``-w eps / scale`` and
  the direct ``-w / scale`` term disappears;
* ``analytic-kl``: no ``log p(z)`` or ``log q`` terms in ``g_z``; the closed-form KL adds
  ``w loc`` to loc and ``w (scale - 1/scale)`` to scale;
* score function (``score``, ``score-*-baseline``): z is not differentiated; with the learning
  signal ``A = log p(x, z) - log q(z|x) - baseline`` per image, dL/dloc = -w A eps / scale
  and dL/dscale = -w A (eps^2 - 1) / scale.

These are the same surrogates as :data:`~pyro_vae.registry.ESTIMATORS`' ``draw_loss``; the
lab compares one probe draw with Pyro's ``loss_and_grads`` before it uses this kernel, and the
tests compare the two draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...models.encoders import DiagonalNormal
from ...models.layers import ACTIVATIONS, MIN_SCALE

if TYPE_CHECKING:
    from ..estimators import Estimator

#: activation module type -> derivative as a function of (pre-activation a, output h).
DERIVATIVES: dict[type[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Softplus: lambda a, h: torch.sigmoid(a),
    nn.ReLU: lambda a, h: (a > 0).to(a.dtype),
    nn.Tanh: lambda a, h: 1 - h * h,
    nn.ELU: lambda a, h: torch.where(a > 0, torch.ones_like(h), h + 1),
    nn.LeakyReLU: lambda a, h: torch.where(a > 0, torch.ones_like(h), torch.full_like(h, 0.01)),
    nn.SiLU: lambda a, h: torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a))),
}
assert set(DERIVATIVES) == set(ACTIVATIONS.values())

#: Surrogate forms (:attr:`Estimator.surrogate`) whose latent cotangents are written out.
SUPPORTED = ("pathwise", "path-derivative", "analytic-kl", "score-function")


@dataclass
class _Layer:
    name: str  # parameter prefix, e.g. "decoder.net.0"
    weight: torch.Tensor
    bias: torch.Tensor
    activation: nn.Module | None  # applied after this layer


def _layers(prefix: str, seq: nn.Sequential) -> list[_Layer]:
    out: list[_Layer] = []
    for i, module in enumerate(seq):
        if isinstance(module, nn.Linear):
            out.append(_Layer(f"{prefix}.{i}", module.weight.detach(), module.bias.detach(), None))
        elif type(module) in DERIVATIVES and out and out[-1].activation is None:
            out[-1].activation = module
        else:
            raise TypeError(f"unsupported module {module!r}")
    return out


def _mlp_problem(seq: object, what: str) -> str | None:
    if not isinstance(seq, nn.Sequential):
        return f"the {what} is not a Sequential of Linear layers and activations"
    for module in seq.modules():
        if not isinstance(module, (nn.Sequential, nn.Linear)) and type(module) not in DERIVATIVES:
            return f"the {what} holds {type(module).__name__}, which has no derivative here"
    return None


def _resolve(estimator: Estimator | str) -> Estimator:
    from ...registry import ESTIMATORS

    return ESTIMATORS.get_or_raise(estimator) if isinstance(estimator, str) else estimator


def unsupported_reason(vae: nn.Module, estimator: Estimator | str) -> str | None:
    """Why :class:`MLPGradients` cannot reproduce this program's draws, or None if its
    structure is the one written out: an encoder ``head(body(x))`` with MLP ``body`` and a
    diagonal-Normal family, a decoder ``likelihood(net(z))`` with MLP ``net`` whose likelihood
    is a Bernoulli on logits, the N(0, I) prior, and a supported surrogate. The lab still holds
    the kernel to Pyro on a probe draw before using it."""
    import pyro.distributions as dist

    estimator = _resolve(estimator)
    if estimator.surrogate not in SUPPORTED:
        return f"estimator {estimator.name} has a {estimator.surrogate} surrogate"
    enc, dec = vae.encoder, vae.decoder
    if not isinstance(getattr(enc, "family", None), DiagonalNormal) \
            or not isinstance(getattr(enc, "head", None), nn.Linear):
        return "the encoder is not head(body(x)) with a diagonal-Normal family"
    body = getattr(enc, "body", None)
    if not (isinstance(body, nn.Sequential) and len(body) == 2
            and type(body[1]) in DERIVATIVES):
        return "the encoder's body is not an MLP followed by an activation"
    problem = _mlp_problem(body[0], "encoder's body") or _mlp_problem(
        getattr(dec, "net", None), "decoder's net")
    if problem is not None:
        return problem
    probe = torch.zeros(1, dec.net[-1].out_features, device=dec.net[-1].weight.device)
    px = dec.likelihood(probe)
    if not (isinstance(px, dist.Independent) and type(px.base_dist) is dist.Bernoulli):
        return "the decoder's likelihood is not a Bernoulli on logits"
    prior = vae.prior()
    base = getattr(prior, "base_dist", None)
    if not (isinstance(prior, dist.Independent) and type(base) is dist.Normal
            and bool((base.loc == 0).all()) and bool((base.scale == 1).all())):
        return "the prior is not N(0, I)"
    if any(p.requires_grad for p in vae.prior.parameters()):
        return "the prior has parameters, whose gradients are not written out"
    return None


class MLPGradients:
    """``eps -> {parameter name: (draws, *shape) gradient}`` for one minibatch and estimator.

    Args:
        vae: a VAE for which :func:`unsupported_reason` is None.
        estimator: the registry entry or its name (its surrogate must be one of
            :data:`SUPPORTED`).
        x: the fixed minibatch ``(batch, num_pixels)``.
        baseline: per-image baseline of the score-function estimators, in the per-image
            units of :func:`pyro_vae.variance.baseline_for`, or None.
        dtype: ``torch.float32``, or ``torch.bfloat16``: matrix products in bfloat16 with
            float32 accumulation, and the decoder's activations, logits and the per-draw
            gradients stored in bfloat16 (each elementwise kernel computes in float32); the
            learning signal's sums are float32. A draw's gradient then differs from float32
            by 0.1-0.4% (relative L2 norm, same noise).
    """

    def __init__(self, vae: nn.Module, estimator: Estimator | str, x: torch.Tensor,
                 baseline: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        estimator = _resolve(estimator)
        reason = unsupported_reason(vae, estimator)
        if reason is not None:
            raise ValueError(reason)
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            self._setup(vae, estimator, x, baseline, dtype)

    def _setup(self, vae: nn.Module, estimator: Estimator, x: torch.Tensor,
               baseline: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.surrogate = estimator.surrogate
        self.score = estimator.surrogate == "score-function"
        self.baseline = baseline if self.score else None
        self.dtype = dtype
        self.x = x
        self.encoder = _layers("encoder.body.0", vae.encoder.body[0])
        self.encoder[-1].activation = vae.encoder.body[1]
        head = vae.encoder.head
        self.head = _Layer("encoder.head", head.weight.detach(), head.bias.detach(), None)
        self.decoder = _layers("decoder.net", vae.decoder.net)
        self.latent_dim = self.head.weight.shape[0] // 2
        # The encoder's forward pass is the same for every draw: keep its activations.
        self.inputs, self.pre = [], []
        h = x
        for layer in self.encoder:
            self.inputs.append(h)
            a = h @ layer.weight.T + layer.bias
            h = layer.activation(a)
            self.pre.append((a, h))
        self.last_hidden = h
        loc, raw = (h @ self.head.weight.T + self.head.bias).chunk(2, dim=-1)
        self.loc, self.raw = loc, raw
        self.scale = torch.nn.functional.softplus(raw) + MIN_SCALE
        self.dscale_draw = torch.sigmoid(raw)
        self._sum_log_scale = torch.log(self.scale).sum(-1)  # of log q, the same every draw
        self._cast: dict[str, torch.Tensor] = {}
        # shared inputs of the encoder layers and head, and activation derivatives, transposed
        self._shared_float = [*self.inputs, self.last_hidden]
        self._shared_lp = [self._lp(t) for t in self._shared_float]
        self._shared_deriv_t = [
            self._lp(DERIVATIVES[type(layer.activation)](a, h).T.contiguous())
            for layer, (a, h) in zip(self.encoder, self.pre)]
        # sum_p x_p l_p through the decoder's last layer: x W_last and x . b_last, per image
        last = self.decoder[-1]
        self._x_weight = x @ last.weight
        self._x_bias = x @ last.bias
        self._x_lp = self._lp(x)

    # -- helpers ----------------------------------------------------------------------------------
    def _lp(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def _weight(self, layer: _Layer) -> torch.Tensor:
        if layer.name not in self._cast:
            self._cast[layer.name] = self._lp(layer.weight)
        return self._cast[layer.name]

    def _linear(self, h: torch.Tensor, layer: _Layer) -> torch.Tensor:
        # mm then an in-place bias add: a bfloat16 addmm is several times slower than mm on CPU
        out = torch.matmul(h, self._weight(layer).T)
        return out.add_(self._lp(layer.bias))

    def _decoder_forward(self, z: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """Each decoder layer's input (low precision), (pre-activation, output) pairs, logits."""
        inputs, pre = [], []
        h = self._lp(z)
        for layer in self.decoder:
            inputs.append(h)
            a = self._linear(h, layer)
            if layer.activation is None:
                return inputs, pre, a
            h = layer.activation(a)
            pre.append((a, h))
        raise AssertionError("the decoder ends with an activation")

    # -- the gradients ----------------------------------------------------------------------------
    def __call__(self, eps: torch.Tensor, summed: bool = False) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(eps.device.type, enabled=False):
            return self._gradients(eps, summed)

    def _gradients(self, eps: torch.Tensor, summed: bool) -> dict[str, torch.Tensor]:
        """Gradients of ``eps.shape[0]`` draws; ``eps`` is ``(draws, particles, batch, latent)``.

        Returns ``{name: (draws, *parameter shape)}``, in :attr:`dtype` for the large weight
        matrices (float32 otherwise); with ``summed``, ``{name: parameter shape}``, the sum over
        the draws (each product then runs over all draws at once: cheaper when only the mean
        is wanted).
        """
        n, particles, batch, latent = eps.shape
        rows = particles * batch
        w = 1.0 / rows
        loc, scale = self.loc, self.scale
        z = loc + scale * eps  # (n, S, B, L)
        inputs, pre, logits = self._decoder_forward(z.reshape(n, rows, latent))
        logits = logits.view(n, particles, batch, -1)
        grads: dict[str, torch.Tensor] = {}

        if self.score:  # log p(x|z) = sum_p x l - softplus(l)
            if self.dtype == torch.float32:  # sum_p x l through the last layer: no pass
                last = inputs[-1].view(n, particles, batch, -1)
                log_px = (last * self._x_weight).sum(-1) + self._x_bias
                log_px -= torch.nn.functional.softplus(logits).sum(-1)
            else:  # both terms from the same rounded logits
                per_pixel = torch.nn.functional.softplus(logits).sub_(logits * self._x_lp)
                log_px = -per_pixel.float().sum(-1)

        # dL/dlogits = w (sigmoid(l) - x), in place over the logits
        g = torch.sigmoid_(logits).sub_(self._x_lp).mul_(w).view(n, rows, -1)

        # decoder backward: per-draw weight gradients are batched products
        for i in range(len(self.decoder) - 1, -1, -1):
            layer = self.decoder[i]
            if summed:
                # (input^T g)^T: with the long draws x rows inner dimension on this side the
                # bf16 product runs about twice as fast on CPU as g^T input
                grads[f"{layer.name}.weight"] = torch.matmul(
                    inputs[i].reshape(n * rows, -1).T, g.reshape(n * rows, -1)).T.float()
                grads[f"{layer.name}.bias"] = g.float().sum((0, 1))
            else:
                grads[f"{layer.name}.weight"] = torch.bmm(g.transpose(1, 2), inputs[i])
                grads[f"{layer.name}.bias"] = g.sum(1)
            g = torch.matmul(g, self._weight(layer))
            if i > 0:
                a, h = pre[i - 1]
                g = g.mul_(DERIVATIVES[type(self.decoder[i - 1].activation)](a, h))
        g_z = g.float().view(n, particles, batch, latent)  # dL/dz through the decoder

        # cotangents at loc and scale, summed over particles
        if self.surrogate == "pathwise":
            g_z = g_z + w * z
            g_loc = g_z.sum(1)
            g_scale = (g_z * eps).sum(1) - particles * w / scale
        elif self.surrogate == "path-derivative":
            g_z = g_z + w * z - w * eps / scale
            g_loc = g_z.sum(1)
            g_scale = (g_z * eps).sum(1)
        elif self.surrogate == "analytic-kl":
            g_loc = g_z.sum(1) + particles * w * loc
            g_scale = (g_z * eps).sum(1) + particles * w * (scale - 1 / scale)
        else:  # score function
            half_log_2pi = 0.5 * math.log(2 * math.pi) * latent
            log_pz = -0.5 * (z * z).sum(-1) - half_log_2pi
            eps2 = eps * eps
            log_q = -0.5 * eps2.sum(-1) - self._sum_log_scale - half_log_2pi
            signal = log_px + log_pz - log_q
            if self.baseline is not None:
                signal = signal - self.baseline
            coef = (-w * signal).unsqueeze(-1) / scale  # (n, S, B, L)
            g_loc = (coef * eps).sum(1)
            g_scale = (coef * (eps2 - 1)).sum(1)

        # encoder backward, transposed: (n, features, batch). Each layer's input is the same in
        # every draw, so one product gives every draw's weight gradient.
        g = torch.cat([g_loc, g_scale * self.dscale_draw], dim=-1).transpose(1, 2)
        layers = [*self.encoder, self.head]
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            out_dim, in_dim = layer.weight.shape
            g = self._lp(g.contiguous())
            if summed:
                total = g.float().sum(0)
                grads[f"{layer.name}.weight"] = total @ self._shared_float[i]
                grads[f"{layer.name}.bias"] = total.sum(1)
            else:
                grads[f"{layer.name}.weight"] = torch.matmul(
                    g.reshape(n * out_dim, batch), self._shared_lp[i]).view(n, out_dim, in_dim)
                grads[f"{layer.name}.bias"] = g.sum(2)
            if i > 0:
                g = torch.matmul(self._weight(layer).T, g).mul_(self._shared_deriv_t[i - 1])
        return grads
