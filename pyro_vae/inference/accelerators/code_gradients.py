"""Per-draw gradients for a discrete code with an MLP decoder and a Bernoulli likelihood.

The discrete variance lab draws R = 1000 gradients per estimator and checkpoint. Under
``torch.func.vmap(grad(...))`` each draw runs the decoder forward and backward through
autograd; this kernel keeps autograd only where the estimator lives and writes the decoder
out by hand, so every estimator is served by the same code:

1. **Which code does the decoder see?** The estimator's own ``draw_loss`` is run (under
   ``vmap``) with a decoder that records its input: the sampled code for the score-function
   estimators, the Concrete sample or its rounding for the relaxed ones. Nothing here knows
   how an estimator builds it.
2. **The decoder by hand, at those codes.** For each row (draw, particle, image) the log-
   likelihood ``ll = sum_p x_p l_p - softplus(l_p)`` of the logits ``l`` and its gradient
   ``J = d ll / d z`` with respect to the decoder's input. When the code takes at most
   :data:`MAX_TABLE_CODES` values and a chunk's codes are hard (0/1 or one-hot), every
   decoder quantity is read from a table computed once per measurement: the decoder is run
   once per code, ``log p(x_i | c)`` for all images and codes is one matrix product, and the
   backward vector ``W_last^T (x_i - sigmoid(l_c))`` is ``x_i W_last - sigmoid(l_c) W_last``,
   both tabled.
3. **The estimator, differentiated on scalars.** ``draw_loss`` runs again under
   ``vmap(grad(...))``, now with a decoder whose ``log_prob`` is the linearisation
   ``ll + J . (z - z.detach())``: its value is ``ll`` and its derivative in z is ``J``, so the
   gradients with respect to the encoder's logits, the prior's parameters and ``ll`` itself
   are exact, and cheap (tensors of draws x particles x images x code size).
4. **The heavy products.** The derivative with respect to ``ll`` is a coefficient per row;
   each decoder layer's per-draw weight gradient is one batched product of the rows'
   cotangents and inputs, and the encoder's weight gradients are its ``vjp`` pulled back
   from the per-draw cotangents at the logits (the encoder's forward pass is shared by all
   draws).

What the kernel assumes -- a decoder ``likelihood(net(flatten(z)))`` with ``net`` an MLP and the
likelihood ``Bernoulli(logits).to_event(1)``, a prior that does not use the encoder -- is
checked by :func:`unsupported_reason`; the lab then compares one probe draw with Pyro's
``loss_and_grads`` on the same noise before using it (``pyro_vae.lab.variance``), and the
tests compare it draw for draw.

:func:`exact_table_gradient` computes the exact ELBO gradient (the lab's oracle) from the same
tables: ``sum_i sum_c q(c|x_i) [log p(x_i|c) + log p(c) - log q(c|x_i)]`` with the decoder run
once per code and the likelihood as a matrix product, instead of ``ExactELBO``'s densities per
(code, image, pixel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from ..discrete import MAX_EXACT_CODES, _unwrap, code_table, num_codes
from .mlp_gradients import DERIVATIVES, _Layer, _layers, _mlp_problem

if TYPE_CHECKING:
    from ..estimators import Estimator

#: Largest code table the kernel builds, the exact oracle's limit (tables are codes x pixels
#: floats).
MAX_TABLE_CODES = MAX_EXACT_CODES


class _Given:
    """Stands in for p(x|z): ``log_prob`` returns values computed outside (step 3)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 - x is fixed
        return self.value


def unsupported_reason(vae: nn.Module, x: torch.Tensor) -> str | None:
    """Why :class:`CodeGradients` cannot reproduce this program's draws, or None: the guide's
    code must be Bernoulli or one-hot units, the decoder ``likelihood(net(flatten(z)))`` with
    an MLP ``net`` and a ``Bernoulli(logits).to_event(1)`` likelihood, and the prior must not
    use the encoder or the decoder."""
    with torch.no_grad():
        q = vae.encoder(x[:1])
    base, _ = _unwrap(q)
    if type(base) not in (dist.Bernoulli, dist.OneHotCategorical):
        return f"the guide's code is {type(base).__name__}, not Bernoulli or one-hot units"
    dec = vae.decoder
    net = getattr(dec, "net", None)
    problem = _mlp_problem(net, "decoder's net")
    if problem is not None:
        return problem
    code_dims = getattr(dec, "code_dims", None)
    if code_dims != len(q.event_shape):
        return "the decoder does not flatten the code into its network's inputs"
    with torch.no_grad():
        z = torch.zeros(1, *q.event_shape, device=x.device)
        px = dec(z)
        px_base, ndims = _unwrap(px)
        if type(px_base) is not dist.Bernoulli or ndims != 1 or "logits" not in vars(px_base):
            return "the decoder's likelihood is not Bernoulli(logits).to_event(1)"
        if not torch.equal(px_base.logits, net(z.reshape(1, -1))):
            return "the decoder's logits are not its net's outputs"
    prior_params = {id(p) for p in vae.prior.parameters()}
    if prior_params & {id(p) for p in (*vae.encoder.parameters(), *dec.parameters())}:
        return "the prior shares parameters with the encoder or the decoder"
    return None


def _code_index(z: torch.Tensor, base: Any, code_dims: int) -> torch.Tensor | None:
    """The index in :func:`~pyro_vae.inference.discrete.code_table` of each hard code in ``z``
    (``(..., *event)`` -> ``(...)``), or None if some entry is not within 1e-5 of a hard code
    (a straight-through code is hard up to the rounding of ``soft + (hard - soft)``)."""
    hard = z.round()
    if not bool(((z - hard).abs() <= 1e-5).all()):
        return None
    if isinstance(base, dist.OneHotCategorical):
        k = z.shape[-1]
        if not bool((hard.sum(-1) == 1).all()):
            return None
        digits = hard.argmax(-1)  # (..., groups)
        weights = k ** torch.arange(digits.shape[-1], device=z.device)
        return (digits * weights).sum(-1)
    bits = hard.flatten(-code_dims).long()
    return (bits << torch.arange(bits.shape[-1], device=z.device)).sum(-1)


def shared_code_encoder(vae: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]
                        ) -> tuple[Any, torch.Tensor, Callable, Callable]:
    """The encoder's part of a chunk of discrete draws, the same in every draw (x is fixed):
    ``(q, logits, pull_back, make_q)`` with q(z|x) at the parameters, the logits of its units
    and their ``vjp`` with respect to the ``encoder.*`` entries of ``params`` (made once, in
    float32 whatever the autocast), and ``logits -> q`` rebuilding q from (batched) logits."""
    enc = {k[len("encoder."):]: v for k, v in params.items() if k.startswith("encoder.")}
    with torch.no_grad():
        template = vae.encoder(x)
    base, ndims = _unwrap(template)

    def encode(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return _unwrap(functional_call(vae.encoder, p, (x,)))[0].logits

    with torch.autocast(x.device.type, enabled=False):
        logits, pull_back = vjp(encode, enc)

    def make_q(logits: torch.Tensor) -> Any:
        return type(base)(logits=logits, validate_args=False).to_event(ndims)

    return template, logits, pull_back, make_q


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``table[index]``, ``(*index.shape, columns)``: into a new tensor through ``out=``,
    several times faster on CPU than the allocating ``index_select``, whose kernel gathers
    element by element."""
    flat = index.reshape(-1)
    out = table.new_empty(flat.shape[0], table.shape[1])
    return torch.index_select(table, 0, flat, out=out).view(*index.shape, -1)


class CodeGradients:
    """``noise -> {parameter name: (draws, *shape) gradient}`` for one minibatch and estimator.

    Args:
        vae: a VAE for which :func:`unsupported_reason` is None.
        estimator: the registry entry (its ``draw_loss`` defines the draws).
        x: the fixed minibatch ``(batch, num_pixels)``.
        baseline: per-image baseline of the score-function estimators, or None.
        params: the measured parameters (detached), by name.
        temperature, relaxed_density: the relaxation of the relaxed estimators.
        table: read the decoder from a per-code table where the codes are hard and there are
            at most :data:`MAX_TABLE_CODES` of them.
    """

    def __init__(self, vae: nn.Module, estimator: Estimator, x: torch.Tensor,
                 baseline: torch.Tensor | None, params: dict[str, torch.Tensor],
                 temperature: float = 1.0, relaxed_density: str = "discrete",
                 table: bool = True):
        # the shared encoder pass and the tables in float32 whatever autocast the caller runs
        # under (under a bf16 autocast they would be made in bf16)
        with torch.autocast(x.device.type, enabled=False):
            self._setup(vae, estimator, x, baseline, params, temperature, relaxed_density,
                        table)

    def _setup(self, vae: nn.Module, estimator: Estimator, x: torch.Tensor,
               baseline: torch.Tensor | None, params: dict[str, torch.Tensor],
               temperature: float, relaxed_density: str, table: bool) -> None:
        from ..estimators import Draw

        self.x = x
        self.names = list(params)
        self.rest = {k: v for k, v in params.items()
                     if not k.startswith(("encoder.", "decoder."))}
        template, self.logits, self._pull_back, make_q = shared_code_encoder(vae, x, params)
        self.base = _unwrap(template)[0]
        self.event_shape = template.event_shape
        self.code_dims = len(self.event_shape)

        def prior_of(rest: dict[str, torch.Tensor]) -> Any:
            return functional_call(vae.prior, {k[len("prior."):]: v for k, v in rest.items()
                                               if k.startswith("prior.")}, ())

        def run(logits: torch.Tensor, rest: dict[str, torch.Tensor], noise: torch.Tensor,
                decoder: Callable[[torch.Tensor], Any]) -> torch.Tensor:
            draw = Draw(x, make_q(logits), noise, decoder, prior_of(rest), baseline,
                        discrete=True, temperature=temperature,
                        relaxed_density=relaxed_density)
            return estimator.draw_loss(draw)

        code_dims = self.code_dims

        def seen(logits: torch.Tensor, rest: dict[str, torch.Tensor], noise: torch.Tensor
                 ) -> torch.Tensor:
            box: list[torch.Tensor] = []

            def record(z: torch.Tensor) -> _Given:
                box.append(z)
                return _Given(z.new_zeros(z.shape[:-code_dims]))

            run(logits, rest, noise, record)
            # the same input any number of times (the score function's log p(x, z) is read
            # twice), never several (REBAR: at the code and at two relaxed samples)
            if any(z is not box[0] for z in box):
                raise ValueError(f"the estimator's draw runs the decoder at {len(box)} inputs; "
                                 f"the kernel reproduces one")
            return box[0]

        def linearised(logits: torch.Tensor, rest: dict[str, torch.Tensor], ll: torch.Tensor,
                       jac: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            def decoder(z: torch.Tensor) -> _Given:
                dims = tuple(range(-code_dims, 0))
                return _Given(ll + ((z - z.detach()) * jac).sum(dims))

            return run(logits, rest, noise, decoder)

        self._seen_one = seen
        self._seen = vmap(seen, in_dims=(None, None, 0), randomness="error")
        self._scalar = vmap(grad(linearised, argnums=(0, 1, 2)),
                            in_dims=(None, None, 0, 0, 0), randomness="error")
        #: whether the decoder's input may depend on the logits: a code that is not the noise
        #: itself, or one whose gradient to the logits is not zero on the first chunk
        self._path: bool | None = None
        #: whether the decoder sees the noise itself (the score-function estimators' sampled
        #: codes): then later chunks skip step 1. Read off the first chunk.
        self._sees_noise: bool | None = None
        #: whether the gradients depend on the value of ll (a learning signal, importance
        #: weights) or only on its derivative (pathwise relaxed surrogates): then soft codes
        #: skip the pixel-wide softplus of ll. Read off the first chunk by moving each row's
        #: ll by a different amount and comparing.
        self._ll_used: bool | None = None

        # the decoder, by hand
        self.layers: list[_Layer] = _layers("decoder.net", vae.decoder.net)
        last = self.layers[-1]
        self._x_weight = x @ last.weight  # x_i W_last: (batch, hidden)
        self._x_bias = x @ last.bias  # x_i . b_last: (batch,)
        self.table = None
        if table and num_codes(template) <= MAX_TABLE_CODES:
            self.table = self._make_table(code_table(template, device=x.device))

    # -- the decoder ------------------------------------------------------------------------------
    def _forward(self, rows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                    torch.Tensor]:
        """Each layer's input, each hidden layer's activation derivative, and the logits."""
        inputs, derivs = [], []
        h = rows
        for layer in self.layers:
            inputs.append(h)
            a = torch.nn.functional.linear(h, layer.weight, layer.bias)
            if layer.activation is None:
                return inputs, derivs, a
            h = layer.activation(a)
            derivs.append(DERIVATIVES[type(layer.activation)](a, h))
        raise AssertionError("the decoder ends with an activation")

    def _make_table(self, codes: torch.Tensor) -> dict[str, Any]:
        """Per code c: each layer's input and derivative, sigmoid(l_c), sigmoid(l_c) W_last,
        and log p(x_i | c) for every image, ``(batch, codes)``."""
        inputs, derivs, logits = self._forward(codes.reshape(codes.shape[0], -1))
        probs = torch.sigmoid(logits)
        log_px = self.x @ logits.T - torch.nn.functional.softplus(logits).sum(-1)
        return {"inputs": inputs, "derivs": derivs, "probs": probs,
                "probs_weight": probs @ self.layers[-1].weight, "log_px": log_px}

    def _decoder_rows(self, z: torch.Tensor, with_ll: bool = True) -> dict[str, Any]:
        """``z`` ``(n, K, B, *event)`` -> per row: layer inputs and derivatives, sigmoid of the
        logits, the backward vector at the last hidden layer (for a coefficient of 1) and
        ``ll``, each with leading dims ``(n, K, B)`` (``with_ll`` false: ll of soft codes is
        left at 0, for an estimator that does not read its value)."""
        n, k, b = z.shape[:3]
        index = _code_index(z, self.base, self.code_dims) if self.table is not None else None
        if index is not None:
            t = self.table

            def gather(m: torch.Tensor) -> torch.Tensor:
                return _gather(m, index)

            images = torch.arange(b, device=z.device) * t["log_px"].shape[1]
            # the pixel-wide probabilities are gathered later, a sub-chunk at a time
            return {"inputs": [gather(m) for m in t["inputs"]],
                    "derivs": [gather(m) for m in t["derivs"]],
                    "index": index,
                    "back": self._x_weight - gather(t["probs_weight"]),
                    "ll": t["log_px"].reshape(-1)[index + images]}
        # one 2-d product per layer (a 4-d matmul runs at half the rate on CPU)
        inputs, derivs, logits = self._forward(z.reshape(n * k * b, -1))
        shaped = lambda t: t.view(n, k, b, -1)  # noqa: E731
        # sum_p x_p l_p through the last layer: h . (x W_last) + x . b_last, no pass over pixels
        if with_ll:
            ll = (shaped(inputs[-1]) * self._x_weight).sum(-1) + self._x_bias
            ll -= torch.nn.functional.softplus(logits).view(n, k, b, -1).sum(-1)
        else:
            ll = z.new_zeros(n, k, b)
        probs = torch.sigmoid_(logits)
        back = self._x_weight - shaped(probs @ self.layers[-1].weight)
        return {"inputs": [shaped(t) for t in inputs], "derivs": [shaped(t) for t in derivs],
                "probs": shaped(probs), "back": back, "ll": ll}

    def _probs(self, rows: dict[str, Any]) -> torch.Tensor:
        """sigmoid of the rows' logits, ``(n, K, B, pixels)`` (gathered from the table)."""
        if "probs" in rows:
            return rows["probs"]
        return _gather(self.table["probs"], rows["index"])

    def _input_gradient(self, rows: dict[str, Any]) -> torch.Tensor:
        """J = d ll / d z per row, from the backward vector at the last hidden layer."""
        g = rows["back"]
        for i in range(len(self.layers) - 1, 0, -1):
            g = torch.matmul(g * rows["derivs"][i - 1], self.layers[i - 1].weight)
        return g

    # -- the draws --------------------------------------------------------------------------------
    def __call__(self, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gradients of the draws of ``noise`` ``(draws, particles, batch, *event)``."""
        return next(iter(self.chunks(noise, noise.shape[0])))

    def chunks(self, noise: torch.Tensor, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The gradients of the draws of ``noise``, ``size`` draws at a time. Steps 1-3 run
        once for all of them (their cost is mostly ``vmap``'s per call); the heavy products of
        step 4 run per ``size`` draws, whose rows and gradients stay in cache."""
        # float32 whatever autocast the caller runs under; the context is entered and left
        # around each step, never held across a yield (autocast's state is per thread)
        steps = self._draws(noise, size)
        while True:
            with torch.autocast(noise.device.type, enabled=False):
                out = next(steps, None)
            if out is None:
                return
            yield out

    def _depends_on_logits(self, noise: torch.Tensor) -> bool:
        """Whether the code the decoder sees carries a gradient to the logits (relaxed
        estimators) or not (score-function ones), read off one draw."""
        probe = torch.randn(noise.shape[1:], generator=torch.Generator().manual_seed(0)
                            ).to(noise.device)
        g = grad(lambda lg: (self._seen_one(lg, self.rest, noise[0]) * probe).sum())(
            self.logits)
        return bool((g != 0).any())

    def _draws(self, noise: torch.Tensor, size: int) -> Iterator[dict[str, torch.Tensor]]:
        if noise.dim() != 3 + len(self.event_shape) or noise.shape[2] != self.x.shape[0]:
            raise ValueError(f"noise of shape {tuple(noise.shape)} is not (draws, particles, "
                             f"batch, *event): the kernel reproduces one code or one set of "
                             f"uniforms per unit and draw")
        n, k, b = noise.shape[:3]
        with torch.no_grad():
            if self._sees_noise:  # checked on the first chunk: the code is the noise itself
                z = noise
            else:
                z = self._seen(self.logits, self.rest, noise)
                if self._sees_noise is None:
                    self._sees_noise = torch.equal(z, noise)
        if self._path is None:
            # a code computed from the logits (a relaxation) keeps J whatever one draw shows:
            # a saturated Concrete sample has a zero gradient there, other draws do not
            self._path = not self._sees_noise or self._depends_on_logits(noise)
        with torch.no_grad():
            parts = [(a, min(a + size, n)) for a in range(0, n, size)]
            rows = [self._decoder_rows(z[a:e], with_ll=self._ll_used is not False)
                    for a, e in parts]
            ll = torch.cat([r["ll"] for r in rows])
            if self._path:
                jac = torch.cat([self._input_gradient(r) for r in rows]).view(
                    n, k, b, *self.event_shape)
            else:  # no path from the logits to z: J is multiplied by zero
                jac = torch.zeros_like(z)
        g_logits, g_rest, coef = self._scalar(self.logits, self.rest, ll, jac, noise)
        if self._ll_used is None:  # does the estimator read ll's value, or only its gradient?
            # moved by a different amount per row: a uniform shift would leave the weights of a
            # multi-sample bound (a softmax over the particles) unchanged
            shift = torch.rand(ll.shape, generator=torch.Generator().manual_seed(0)).to(ll)
            moved = self._scalar(self.logits, self.rest, ll + 1.0 + shift, jac, noise)
            self._ll_used = not all(torch.equal(a, b) for a, b in zip(
                torch.utils._pytree.tree_leaves((g_logits, g_rest, coef)),
                torch.utils._pytree.tree_leaves(moved), strict=True))
        for (a, e), part in zip(parts, rows, strict=True):
            with torch.no_grad():
                (g_enc,) = vmap(self._pull_back)(g_logits[a:e])
                grads = self._decoder_gradients(part, coef[a:e])
            # the newest first: the consumer's first pass over them then finds them in cache
            out = {**grads, **{f"encoder.{name}": v for name, v in g_enc.items()},
                   **{name: v[a:e] for name, v in g_rest.items()}}
            order = [*grads, *(name for name in self.names if name not in grads)]
            yield {name: out[name] for name in order}

    def _decoder_gradients(self, rows: dict[str, Any], coef: torch.Tensor
                           ) -> dict[str, torch.Tensor]:
        """Per-draw gradients of the decoder's parameters for the coefficient ``coef`` =
        d loss / d ll of each row ``(n, K, B)``: cotangent ``coef (x - sigmoid(l))`` at the
        logits, then back through the layers, each weight gradient a batched product."""
        n, k, b = coef.shape
        c = coef.unsqueeze(-1)
        grads: dict[str, torch.Tensor] = {}
        # the logits' cotangent is c (x - sigmoid(l)): x - sigmoid(l) in place over the rows'
        # probabilities (the caller's rows are not used again), c applied to the 128-wide side
        # of the last layer's products rather than in one more pass over the pixels
        resid = self._probs(rows)
        torch.sub(self.x, resid, out=resid)
        resid = resid.view(n, k * b, -1)
        c = c.reshape(n, k * b, 1)
        back = c * rows["back"].view(n, k * b, -1)  # = c (x - sigmoid(l)) W_last, from tables
        last = len(self.layers) - 1
        for i in range(last, -1, -1):
            layer = self.layers[i]
            inputs = rows["inputs"][i].reshape(n, k * b, -1)
            if i == last:  # sum_rows c (x - p) h^T and sum_rows c (x - p)
                grads[f"{layer.name}.weight"] = torch.bmm(
                    (c * inputs).transpose(1, 2), resid).transpose(1, 2)
                grads[f"{layer.name}.bias"] = torch.bmm(c.transpose(1, 2), resid).squeeze(1)
                g = back
            else:
                # input^T g, transposed: about a fifth faster on CPU than g^T input
                grads[f"{layer.name}.weight"] = torch.bmm(inputs.transpose(1, 2), g
                                                          ).transpose(1, 2)
                grads[f"{layer.name}.bias"] = g.sum(1)
            if i == 0:
                break
            if i < last:
                g = torch.matmul(g, layer.weight)
            g = g * rows["derivs"][i - 1].reshape(n, k * b, -1)
        return grads


def exact_table_gradient(vae: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """The exact gradient of the per-image negative ELBO, summed over the code table with the
    decoder run once per code and ``log p(x_i|c)`` for all images and codes as one matrix
    product (for a program for which :func:`unsupported_reason` is None; the lab compares it
    with ``ExactELBO`` on a few images before using it). Float32 whatever the autocast."""
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        q = vae.encoder(x)
        codes = code_table(q, device=x.device)  # (C, *event)
        log_q = q.log_prob(codes.unsqueeze(1))  # (C, B)
        log_prior = vae.prior().log_prob(codes)  # (C,)
        logits = vae.decoder.net(codes.reshape(codes.shape[0], -1))  # (C, pixels)
        log_px = logits @ x.T - torch.nn.functional.softplus(logits).sum(-1, keepdim=True)
        elbo = (log_q.exp() * (log_px + log_prior.unsqueeze(-1) - log_q)).sum()
        live = [p for p in params.values()]
        got = torch.autograd.grad(-elbo / x.shape[0], live, allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(p)).detach()
            for (k, p), g in zip(params.items(), got, strict=True)}


__all__ = ["CodeGradients", "exact_table_gradient", "unsupported_reason", "MAX_TABLE_CODES"]
