"""Synthetic traces: routing for any spec, drawn from a few statistics, in the trace format.

A synthetic run has one prompt of ``prompt_tokens`` tokens, then ``gen_tokens`` generated
tokens in blocks of ``block_length``. Its forward passes are those the LLaDA2 generation
loop runs. A prefill pass covers the prompt. Each block then takes denoising steps, each
committing some of its masked tokens. With a KV cache, one cache-write pass per finished
block stores its committed tokens.

Routing model (per MoE layer, per token, ``top_k`` distinct experts):

* **Popularity**: within a block, each MoE layer ranks its experts by a popularity score
  and weights rank r (1-based) by ``r ** -skew`` (a Zipf law). ``skew`` 0 is uniform, and
  larger values concentrate the routing on fewer experts. A token draws its experts from
  these weights without replacement.
* **Drift**: an expert's score is ``sqrt(1 - context_share) * m + sqrt(context_share) * c``,
  both parts standard normal per (layer, expert). The model part ``m`` is drawn from the
  spec's config hash, so every seed of one spec shares it, as prompts run on one model
  do. The context part ``c`` is drawn from the seed for the prompt and the first block,
  and changes from one block to the next as ``c' = (1 - drift) * c + sqrt(1 - (1 - drift)**2) * noise``.
  ``drift`` 0 keeps one ranking for the whole run. ``drift`` 1 draws a new context part
  for every block. The scores of consecutive blocks thus correlate by
  ``1 - context_share * drift``.
* **Persistence**: from one denoising step to the next, each of a block position's
  experts stays with probability ``persistence``. The others are redrawn from the
  popularity weights among the experts the token did not hold at the previous step. A
  model with fewer than 2 x top_k experts redraws among those the token does not hold now.
* **Tokens per forward**: committed tokens per denoising step average
  ``tokens_per_forward``. The number of steps is spread over the blocks at random, and
  each block's tokens are split over its steps at random, every step committing at least
  one token.

A finished block's tokens get their final routing from one more persistence step. That
routing is what the cache-write pass feeds, and without a KV cache it is what every later
pass feeds for that block, because causal attention across blocks keeps finished tokens'
hidden states fixed.

All randomness except the model part of the scores comes from one
``numpy.random.Generator`` seeded with ``seed`` and drawn in a fixed order, so the same
arguments give the same trace.
NOTE: NumPy promises the same stream only for the same NumPy build on the same kind of
machine (its random-number compatibility policy), and its vectorised ``exp`` and ``log``
may round differently on other CPUs, so another build or CPU may give another trace.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tide.errors import InputError
from tide.ir import ForwardInfo
from tide.trace import GenerationSettings, Trace, TraceMetadata

logger = logging.getLogger(__name__)

# Synthetic traces carry a fixed creation time, so that the same arguments give a
# byte-identical file. The arguments themselves are in the metadata's ``extra``.
SYNTHETIC_CREATED_AT = "1970-01-01T00:00:00+00:00"


@dataclass(frozen=True)
class SynthDefaults:
    """Routing statistics a synthetic trace uses unless the caller sets them."""

    tokens_per_forward: float  # committed tokens per denoising step, mean
    skew: float  # Zipf exponent of expert popularity in every MoE layer
    persistence: float  # probability that a token keeps an expert from one step to the next
    drift: float  # change of the context part of the popularity scores from one block to the next
    context_share: float  # share of the popularity scores' variance that follows the context, not the model


# Defaults per shipped spec, fitted by scripts/fit_synth.py on 256-token traces with a
# 64-token prompt (docs/synthetic_traces.md has the procedure and the figures). Tokens per
# forward are the published measurements: 2.60 for LLaDA2.0-mini, 3.19 for LLaDA2.0-flash.
# skew gives mini's published 70 distinct experts per 32-token pass, and persistence its
# adjacent-step cosine similarity of 0.985. drift brings the tide policy's hit rate at 128
# slots per layer and τ = 2 to 0.94, inside the 0.93 to 0.95 of the reference
# implementation's mini logs. Flash takes mini's distinct-expert count (same router
# shape) and mini's drift, because neither is published for flash.
# NOTE: context_share is an estimate, because no published figure measures how popular
# an expert stays across prompts. It sets how well a static hot set profiled on other
# prompts does; scripts/fit_synth.py --trace --fit fits it to recorded traces.
SYNTH_DEFAULTS: dict[str, SynthDefaults] = {
    "llada2-mini": SynthDefaults(tokens_per_forward=2.60, skew=1.58, persistence=0.83, drift=0.68,
                                 context_share=0.8),
    "llada2.1-mini": SynthDefaults(tokens_per_forward=2.60, skew=1.58, persistence=0.83, drift=0.68,
                                   context_share=0.8),
    "llada2-flash": SynthDefaults(tokens_per_forward=3.19, skew=1.57, persistence=0.83, drift=0.68,
                                  context_share=0.8),
}
# For specs without an entry, e.g. a config.json given by path or the embedded tiny model:
# mini's values, the only model with published per-step statistics.
GENERIC_SYNTH_DEFAULTS = SynthDefaults(tokens_per_forward=2.60, skew=1.58, persistence=0.83, drift=0.68,
                                       context_share=0.8)


# Added to a synthetic trace's seed to draw the trace that profiles it (see
# ``profiling_trace_for``), far enough that a sweep over a few seeds never scores a trace
# on itself.
PROFILE_SEED_OFFSET = 1000


def synth_defaults(spec_name: str) -> SynthDefaults:
    """Return the defaults for a spec name, or the generic ones for a spec without an entry."""
    return SYNTH_DEFAULTS.get(spec_name, GENERIC_SYNTH_DEFAULTS)


def synthesize_trace(
    spec,
    *,
    gen_tokens: int,
    prompt_tokens: int = 64,
    seed: int = 0,
    block_length: int = 32,
    steps: int | None = None,
    tokens_per_forward: float | None = None,
    skew: float | Sequence[float] | None = None,
    persistence: float | None = None,
    drift: float | None = None,
    context_share: float | None = None,
    kv_cache: bool = True,
) -> Trace:
    """Draw a synthetic trace for ``spec``; see the module docstring for the model.

    ``steps`` caps the denoising steps of one block (default: ``block_length``, so each
    step commits at least one token). ``skew`` is one Zipf exponent for every MoE layer or
    one per MoE layer. Unset knobs come from ``synth_defaults(spec.name)``.
    Raises InputError naming the argument when one is out of range.
    """
    defaults = synth_defaults(spec.name)
    steps = block_length if steps is None else steps
    tokens_per_forward = defaults.tokens_per_forward if tokens_per_forward is None else tokens_per_forward
    persistence = defaults.persistence if persistence is None else persistence
    drift = defaults.drift if drift is None else drift
    context_share = defaults.context_share if context_share is None else context_share
    skews = _layer_skews(defaults.skew if skew is None else skew, spec.num_moe_layers)
    _check_arguments(gen_tokens, prompt_tokens, seed, block_length, steps, tokens_per_forward, persistence)
    _check_probability(drift, "drift")
    _check_probability(context_share, "context_share")

    rng = np.random.Generator(np.random.PCG64(seed))
    num_blocks = gen_tokens // block_length
    popularity = _Popularity(rng, spec.config_hash, skews, spec.num_experts, drift, context_share)
    steps_per_block = _steps_per_block(rng, num_blocks, block_length, steps, tokens_per_forward)
    router = _Router(rng, popularity.log_weights(), spec.top_k, persistence)
    logger.info("synthesizing %d blocks, %d denoising steps, seed %d, for %s", num_blocks,
                int(steps_per_block.sum()), seed, spec.name)

    # Forward passes in run order, with the routing of the tokens each one feeds.
    forwards: list[ForwardInfo] = []
    routings: list[np.ndarray] = []
    prompt_routing = router.fresh(prompt_tokens)
    forwards.append(ForwardInfo(index=0, kind="prefill", num_tokens=prompt_tokens, context_tokens=prompt_tokens))
    routings.append(prompt_routing)
    prefix = [prompt_routing]  # final routing of the prompt and of every finished block

    for block in range(num_blocks):
        context = prompt_tokens + (block + 1) * block_length
        committed = _split_block(rng, block_length, int(steps_per_block[block]))
        if block > 0:
            # The prompt and the first block share the first context.
            router.set_log_weights(popularity.advance())
        block_routing = router.fresh(block_length)
        for step, count in enumerate(committed):
            if step > 0:
                block_routing = router.persist(block_routing)
            fed = block_routing if kv_cache else np.concatenate(prefix + [block_routing])
            forwards.append(ForwardInfo(index=len(forwards), kind="denoise", block=block, step=step,
                                        num_tokens=len(fed), context_tokens=context, committed_tokens=int(count)))
            routings.append(fed)
        final_routing = router.persist(block_routing)
        prefix.append(final_routing)
        if kv_cache:
            forwards.append(ForwardInfo(index=len(forwards), kind="cache_write", block=block,
                                        num_tokens=block_length, context_tokens=context))
            routings.append(final_routing)

    metadata = TraceMetadata(
        spec_name=spec.name,
        spec_hash=spec.config_hash,
        num_moe_layers=spec.num_moe_layers,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        prompt_ids=(),
        generation=GenerationSettings(block_length=block_length, steps=steps, kv_cache=kv_cache,
                                      gen_tokens=gen_tokens),
        source="synthetic",
        created_at=SYNTHETIC_CREATED_AT,
        extra={"synthetic": {"seed": seed, "prompt_tokens": prompt_tokens, "tokens_per_forward": tokens_per_forward,
                             "skew": list(skews), "persistence": persistence, "drift": drift,
                             "context_share": context_share}},
    )
    experts = np.concatenate(routings).astype(np.int16)
    return Trace(metadata=metadata, forwards=tuple(forwards), experts=experts)


def profiling_trace_for(trace: Trace, spec, *, seed_offset: int = PROFILE_SEED_OFFSET) -> Trace | None:
    """Return a synthetic trace drawn with ``trace``'s arguments and its seed plus ``seed_offset``.

    It stands for a profiling run on other prompts of the same model, which the policies
    that learn from a trace (static's hot sets, the planner's budgets and intervals) should
    see in place of the run they are scored on. Returns None when ``trace`` is not
    synthetic. A synthetic trace written before the drift knob existed has no drift and
    all its popularity follows the seed, so it is redrawn with drift 0 and context share 1.
    """
    settings = trace.metadata.extra.get("synthetic") if trace.metadata.source == "synthetic" else None
    if settings is None:
        return None
    generation = trace.metadata.generation
    return synthesize_trace(
        spec, gen_tokens=generation.gen_tokens, prompt_tokens=settings["prompt_tokens"],
        seed=settings["seed"] + seed_offset, block_length=generation.block_length, steps=generation.steps,
        tokens_per_forward=settings["tokens_per_forward"], skew=settings["skew"],
        persistence=settings["persistence"], drift=settings.get("drift", 0.0),
        context_share=settings.get("context_share", 1.0), kv_cache=generation.kv_cache)


# ---------------------------------------------------------------------------------------
# Arguments


def _layer_skews(skew: float | Sequence[float], num_layers: int) -> tuple[float, ...]:
    if isinstance(skew, (int, float)) and not isinstance(skew, bool):
        skews = (float(skew),) * num_layers
    else:
        skews = tuple(float(s) for s in skew)
        if len(skews) != num_layers:
            raise InputError(f"needs one value or one per MoE layer ({num_layers})", field="skew",
                             value=len(skews), accepted=f"1 or {num_layers} values")
    for i, value in enumerate(skews):
        if not math.isfinite(value) or value < 0:
            raise InputError("must be a finite number >= 0", field=f"skew[{i}]", value=value,
                             accepted="0 (uniform popularity) or more (more concentrated)")
    return skews


def _check_arguments(gen_tokens: int, prompt_tokens: int, seed: int, block_length: int, steps: int,
                     tokens_per_forward: float, persistence: float) -> None:
    if block_length < 1:
        raise InputError("must be at least 1", field="block_length", value=block_length)
    if gen_tokens < block_length or gen_tokens % block_length:
        raise InputError(f"must be a positive multiple of block_length {block_length}, as in LLaDA2 generation",
                         field="gen_tokens", value=gen_tokens,
                         accepted=f"{block_length}, {2 * block_length}, {3 * block_length}, ...")
    if prompt_tokens < 1:
        raise InputError("must be at least 1, because the prefill pass needs a token", field="prompt_tokens",
                         value=prompt_tokens)
    if seed < 0:
        raise InputError("must not be negative", field="seed", value=seed)
    if not 1 <= steps <= block_length:
        raise InputError("must be between 1 and block_length, because each step commits at least one token",
                         field="steps", value=steps, accepted=f"1 to {block_length}")
    lowest = block_length / steps
    if not lowest <= tokens_per_forward <= block_length:
        raise InputError(f"must fit {block_length}-token blocks of at most {steps} steps", field="tokens_per_forward",
                         value=tokens_per_forward, accepted=f"{lowest:g} to {block_length}")
    _check_probability(persistence, "persistence")


def _check_probability(value: float, field: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise InputError("must be between 0 and 1", field=field, value=value, accepted="0 to 1")


# ---------------------------------------------------------------------------------------
# Random draws


class _Popularity:
    """The popularity scores of every (MoE layer, expert), [L, E], and the Zipf weights they give.

    See the module docstring for the model. The model part comes from its own generator,
    seeded by the spec's config hash, so that it does not depend on ``seed``.
    """

    def __init__(self, rng: np.random.Generator, spec_hash: str, skews: Sequence[float], num_experts: int,
                 drift: float, context_share: float) -> None:
        self.rng = rng
        self.skews = np.asarray(skews, dtype=np.float64)[:, None]  # [L, 1]
        self.drift = drift
        self.context_share = context_share
        model_seed = int.from_bytes(hashlib.sha256(spec_hash.encode()).digest()[:8], "little")
        shape = (len(skews), num_experts)
        self.model_scores = np.random.Generator(np.random.PCG64(model_seed)).standard_normal(shape)
        self.context_scores = rng.standard_normal(shape)
        self.log_ranks = np.log(np.arange(1, num_experts + 1, dtype=np.float64))

    def log_weights(self) -> np.ndarray:
        """Return log weights [L, E]: ``-skew * log(rank)``, rank 1 for the highest score."""
        scores = (math.sqrt(1.0 - self.context_share) * self.model_scores
                  + math.sqrt(self.context_share) * self.context_scores)
        order = np.argsort(-scores, axis=1, kind="stable")  # [L, E]: experts from the most popular down
        log_weights = np.empty_like(scores)
        np.put_along_axis(log_weights, order, -self.skews * self.log_ranks[None, :], axis=1)
        return log_weights

    def advance(self) -> np.ndarray:
        """Move the context part on by one block and return the new log weights [L, E]."""
        if self.drift > 0.0:
            kept = 1.0 - self.drift
            noise = self.rng.standard_normal(self.context_scores.shape)
            self.context_scores = kept * self.context_scores + math.sqrt(1.0 - kept * kept) * noise
        return self.log_weights()


def _steps_per_block(rng: np.random.Generator, num_blocks: int, block_length: int, steps: int,
                     tokens_per_forward: float) -> np.ndarray:
    """Spread round(tokens / tokens_per_forward) steps over the blocks, 1 to ``steps`` each."""
    total = round(num_blocks * block_length / tokens_per_forward)
    total = min(max(total, num_blocks), num_blocks * steps)
    counts = np.ones(num_blocks, dtype=np.int64)
    remaining = total - num_blocks
    while remaining > 0:
        open_blocks = np.flatnonzero(counts < steps)
        extra = rng.multinomial(remaining, np.full(len(open_blocks), 1.0 / len(open_blocks)))
        counts[open_blocks] = np.minimum(counts[open_blocks] + extra, steps)
        remaining = total - int(counts.sum())
    return counts


def _split_block(rng: np.random.Generator, block_length: int, num_steps: int) -> np.ndarray:
    """Split a block's tokens into ``num_steps`` positive counts, uniform over all such splits."""
    cuts = np.sort(rng.choice(block_length - 1, size=num_steps - 1, replace=False) + 1)
    return np.diff(np.concatenate(([0], cuts, [block_length])))


class _Router:
    """Draws the top-k expert ids of tokens, [T, L, K], from the popularity weights.

    Experts are drawn one position at a time, each in proportion to the layer's weights
    among the experts the token may not repeat, which is sampling without replacement.
    A draw inverts the CDF of the weights with the excluded experts taken out (see
    ``_draw``), so its cost grows with the experts drawn, not with all experts.
    """

    def __init__(self, rng: np.random.Generator, log_weights: np.ndarray, top_k: int, persistence: float) -> None:
        self.rng = rng
        self.top_k = top_k
        self.persistence = persistence
        self.set_log_weights(log_weights)

    def set_log_weights(self, log_weights: np.ndarray) -> None:
        """Draw from now on from the popularity ``log_weights`` [L, E]."""
        self.log_weights = log_weights
        self.num_layers, self.num_experts = log_weights.shape
        weights = np.exp(log_weights - log_weights.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        self.flat_weights = weights.ravel()  # [L*E]
        # Layer l's CDF shifted by l, so one searchsorted serves every layer.
        cdf = np.cumsum(weights, axis=1) + np.arange(self.num_layers)[:, None]
        cdf[:, -1] = np.arange(1, self.num_layers + 1)
        self.shifted_cdf = cdf.ravel()

    def _draw(self, layers: np.ndarray, excluded: np.ndarray) -> np.ndarray:
        """Draw one expert per entry of ``layers`` [n], never one listed in its row of
        ``excluded`` [n, X] (-1 marks an unused column).

        With u uniform on [0, 1 - excluded weight), the draw is the lowest expert e whose
        CDF minus the excluded weight up to e exceeds u. The loop finds it by searching the
        CDF for u plus the excluded weight up to the last guess, until that weight stops
        growing, which takes at most X + 1 rounds.
        """
        num_experts = self.num_experts
        excluded = np.sort(excluded, axis=1)
        excluded[:, 1:][excluded[:, 1:] == excluded[:, :-1]] = -1  # count a repeated expert once
        valid = excluded >= 0
        excluded_weight = np.where(valid, self.flat_weights[layers[:, None] * num_experts + np.maximum(excluded, 0)],
                                   0.0)
        target = self.rng.random(len(layers)) * (1.0 - excluded_weight.sum(axis=1))
        skipped = np.zeros(len(layers))
        drawn = np.full(len(layers), -1, dtype=np.int64)
        pending = np.arange(len(layers))
        for _ in range(excluded.shape[1] + 1):
            found = np.searchsorted(self.shifted_cdf, layers[pending] + target[pending] + skipped[pending],
                                    side="right")
            guess = np.minimum(found - layers[pending] * num_experts, num_experts - 1)
            below = valid[pending] & (excluded[pending] <= guess[:, None])
            weight = (excluded_weight[pending] * below).sum(axis=1)
            settled = weight == skipped[pending]
            drawn[pending[settled]] = guess[settled]
            skipped[pending[~settled]] = weight[~settled]
            pending = pending[~settled]
            if pending.size == 0:
                break

        # Rounding can, very rarely, leave a draw unsettled or on an excluded expert: draw
        # those again exactly, with Gumbel keys over all experts.
        again = np.flatnonzero((drawn < 0) | (excluded == drawn[:, None]).any(axis=1))
        if again.size:
            keys = self.log_weights[layers[again]] + self.rng.gumbel(size=(again.size, num_experts))
            rows, columns = np.nonzero(valid[again])
            keys[rows, excluded[again][rows, columns]] = -np.inf
            drawn[again] = np.argmax(keys, axis=1)
        return drawn

    def _fill(self, routing: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Draw the entries of ``routing`` [T, L, K] where ``missing`` is true, position by
        position, each distinct from the token's other experts in that layer."""
        flat = routing.reshape(-1, self.top_k)  # [T*L, K]
        flat_missing = missing.reshape(-1, self.top_k)
        before = flat.copy()
        layers = np.tile(np.arange(self.num_layers), routing.shape[0])
        enough = self.num_experts >= 2 * self.top_k
        for position in range(self.top_k):
            rows = np.flatnonzero(flat_missing[:, position])
            if rows.size == 0:
                continue
            if enough:
                # Exclude every expert the row held before this step and every one drawn
                # since, so a replacement is always an expert the token did not have.
                excluded = np.concatenate([before[rows], flat[rows]], axis=1)
            else:
                # Too few experts for that: exclude only the kept experts and earlier draws.
                excluded = flat[rows].copy()
                excluded[flat_missing[rows] & (np.arange(self.top_k) >= position)] = -1
            flat[rows, position] = self._draw(layers[rows], excluded)
        return routing

    def fresh(self, num_tokens: int) -> np.ndarray:
        routing = np.full((num_tokens, self.num_layers, self.top_k), -1, dtype=np.int64)
        return self._fill(routing, np.ones(routing.shape, dtype=bool))

    def persist(self, routing: np.ndarray) -> np.ndarray:
        """Return the next step's routing: each expert kept with probability ``persistence``."""
        replaced = self.rng.random(routing.shape) >= self.persistence  # [T, L, K]
        return self._fill(routing.copy(), replaced)
