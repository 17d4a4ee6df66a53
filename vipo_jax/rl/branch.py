"""BranchGRPO-style tree rollouts (arXiv 2509.06040) as pure, jittable functions.

A prompt's G samples share a prefix: the rollout starts from one root per prompt and, at chosen
transitions ("split steps"), every current node spawns ``b`` children with independent SDE noise;
``G = b ** len(split_steps)`` leaves. Rewards are computed on the leaves, fused up to every
internal node, and normalised per depth: each edge (transition) gets the advantage of the node it
leads to, a dense, step-level signal (the shared prefix, one node per depth, gets none).
Reference: the authors' ``fastvideo/train_branchgrpo_flux.py`` (``run_tree_sample_step``,
``compute_node_rewards_from_leaves``, ``compute_hierarchical_advantages_by_depth``) and its
recipe ``scripts/finetune/finetune_flux_branchgrpo_8gpus.sh`` (20 steps, splits at 0,3,6,9,
b = 2, G = 16).

Layout (static, from :class:`TreeSpec` and the number of prompts ``P``). ``n_d`` nodes per tree at
depth ``d`` (the state after ``d`` transitions): ``n_0 = 1``, multiplied by ``b`` after each split
step. All node states live in one array ``nodes`` (N, ...), depth-major; inside a depth
prompt-major, then the node's index in its tree; the children of node ``c`` are
``c*b .. c*b+b-1`` (node-major), so leaf ``l`` descends from node ``l // (G / n_d)`` of depth
``d``, and prompt ``p``'s leaves are samples ``p*G .. p*G+G-1``, prompt-major like the flat
rollout's batch. Every non-root node has exactly one incoming edge: edge ``e`` leads to node
``P + e``; ``edge_parent``/``edge_t`` give its parent node and transition index, so
``x = nodes[edge_parent]``, ``x_next = nodes[P + e]``, ``sigma = sigmas[edge_t]``: the per-transition
training of the flat rollout consumes edges as samples (each with its own sigma, cond of its prompt
``edge_prompt`` and advantage), each unique transition once.

Sampling (as the reference): non-split steps are SDE steps (noise ``eta``), or ODE steps where
``sde_mask`` is False (BranchGRPO-Mix); split steps are always SDE; the last transition is the ODE
step to sigma = 0 (never trained, so ``nodes`` at depth S equal the leaves' clean predictions).
At a split step the children's noise is multiplied by ``split_noise_scale`` (the reference's
``tree_split_noise_scale``, 4.0 in its recipe) while the stored log-prob is that of the policy
``N(mean, std^2)``, as in the reference: the training recomputation equals it (ratio exactly 1
on-policy), but with a scale != 1 the children are not samples of the policy the ratio refers to.
Transition ``i``'s noise is ``normal(split(key, S)[i], (P * n_{i+1}, ...))``, child-indexed.

Reward fusion (``fuse``): leaves carry their value; an internal node gets the mean of its children
(``"mean"``, the reference default; in a balanced tree this is the mean over its leaf descendants)
or a softmax over its children's edge log-probs, ``sum_c softmax(alpha * logp_c) * r_c``
(``"prob"``, the reference's ``tree_prob_weighted``, alpha = 1, log-probs averaged over the latent's
elements), applied from the leaves up. Values may carry trailing axes (per-position maps).

Depth-wise advantages: at every depth, over one prompt's ``n_d`` nodes,
``A = (r - mean) / (std + 1e-8)`` with the unbiased std; 0 where ``n_d = 1`` or the std is
``< 1e-6`` (reference ``compute_hierarchical_advantages_by_depth``). Edge advantage = advantage of
its child node.

Pruning (reference ``--depth_pruning``): :func:`edge_train_mask` drops edges by child depth; width
pruning (keeping a subset of last-layer transitions by reward) is not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vipo_jax.errors import ConfigError
from vipo_jax.rl.sde import sde_mean_std, transition_logprob, x0_prediction

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
FUSIONS = ("mean", "prob")


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """Static tree shape: ``num_steps`` transitions, ``split_steps`` (sorted, in ``0..S-2``) at
    which each node spawns ``branch`` children."""

    num_steps: int
    split_steps: tuple[int, ...]
    branch: int = 2

    def __post_init__(self):
        s, b, sp = int(self.num_steps), int(self.branch), tuple(int(i) for i in self.split_steps)
        if s < 2:
            raise ConfigError(f"a tree rollout needs at least 2 sampling steps, got {s}")
        if b < 2:
            raise ConfigError(f"branch factor must be >= 2, got {b}")
        if not sp:
            raise ConfigError("a tree rollout needs at least one split step")
        if list(sp) != sorted(set(sp)) or sp[0] < 0 or sp[-1] > s - 2:
            raise ConfigError(f"split_steps {sp} must be strictly increasing in 0..{s - 2} (the last "
                              "transition is the deterministic step to sigma = 0)")
        object.__setattr__(self, "split_steps", sp)

    @property
    def leaves(self) -> int:
        """G, the leaves per tree (the group size)."""
        return int(self.branch) ** len(self.split_steps)

    def fanout(self, i: int) -> int:
        """Children per node at transition ``i``: ``branch`` at split steps, else 1."""
        return int(self.branch) if i in self.split_steps else 1

    def nodes_at(self, d: int) -> int:
        """``n_d``, nodes per tree at depth ``d`` (0..S)."""
        return int(self.branch) ** sum(1 for i in self.split_steps if i < d)

    def counts(self) -> np.ndarray:
        return np.asarray([self.nodes_at(d) for d in range(self.num_steps + 1)], np.int64)


@dataclasses.dataclass(frozen=True)
class TreeIndex:
    """Static index arrays of a tree batch (numpy; ``P`` prompts)."""

    depth_offset: np.ndarray  # (S+2,) start of each depth in ``nodes``; last = N
    node_depth: np.ndarray  # (N,)
    node_prompt: np.ndarray  # (N,)
    edge_parent: np.ndarray  # (E,) parent node of edge e (which leads to node P + e)
    edge_t: np.ndarray  # (E,) transition index
    edge_prompt: np.ndarray  # (E,)
    leaf_ancestor: np.ndarray  # (S+1, P*G) node index of each leaf's ancestor at every depth


def tree_index(spec: TreeSpec, num_prompts: int) -> TreeIndex:
    """The static layout of ``num_prompts`` trees (see the module docstring)."""
    p, s, g = int(num_prompts), int(spec.num_steps), spec.leaves
    n = spec.counts()
    offset = np.concatenate([[0], np.cumsum(p * n)]).astype(np.int64)
    node_depth = np.concatenate([np.full(p * n[d], d) for d in range(s + 1)])
    node_prompt = np.concatenate([np.repeat(np.arange(p), n[d]) for d in range(s + 1)])
    parents, ts = [], []
    for i in range(s):
        f = spec.fanout(i)
        c = np.arange(p * n[i + 1])
        prompt, local = c // n[i + 1], c % n[i + 1]
        parents.append(offset[i] + prompt * n[i] + local // f)
        ts.append(np.full(c.shape, i))
    edge_parent = np.concatenate(parents)
    leaf = np.arange(p * g)
    anc = np.stack([offset[d] + (leaf // g) * n[d] + (leaf % g) // (g // n[d]) for d in range(s + 1)])
    return TreeIndex(depth_offset=offset, node_depth=node_depth, node_prompt=node_prompt,
                     edge_parent=edge_parent, edge_t=np.concatenate(ts), edge_prompt=node_prompt[p:],
                     leaf_ancestor=anc)


def _repeat_cond(cond: Any, n: int) -> Any:
    return cond if n == 1 else jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), cond)


def tree_rollout(velocity_fn: VelocityFn, x_init: jax.Array, cond: Any, sigmas: jax.Array, eta: jax.Array | float,
                 key: jax.Array, spec: TreeSpec, *, split_noise_scale: float = 1.0, sde_mask: jax.Array | None = None,
                 logprob_fn: Callable[..., jax.Array] = transition_logprob) -> dict[str, jax.Array]:
    """Sample ``P`` trees from ``x_init`` (P, ...) (one root per prompt) with conditioning ``cond``
    (per-prompt pytree, leading axis P).

    Returns ``nodes`` (N, ...) every node state, ``edge_log_probs`` (E, ...) element-wise log-prob
    of each edge under the sampling policy (0 on ODE edges), ``x0`` (P*G, ...) the leaves' clean
    predictions (prompt-major, the samples to decode and reward), ``sde_edges`` (E,) bool.
    Between split steps the steps run as one ``lax.scan`` per segment (batch ``P * n_d``)."""
    x_init = jnp.asarray(x_init, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    s = int(spec.num_steps)
    if sigmas.shape[0] != s + 1:
        raise ConfigError(f"sigmas has {sigmas.shape[0]} entries, the tree spec {s + 1}")
    p = x_init.shape[0]
    b = int(spec.branch)
    mask = jnp.ones((s,), bool) if sde_mask is None else jnp.asarray(sde_mask, bool)
    if mask.shape != (s,):
        raise ConfigError(f"sde_mask must have shape ({s},), got {mask.shape}")
    split = np.zeros((s,), bool)
    split[list(spec.split_steps)] = True
    mask = (mask | jnp.asarray(split)) & (jnp.arange(s) < s - 1)
    etas = jnp.where(mask, jnp.asarray(eta, jnp.float32), jnp.float32(0.0))
    keys = jax.random.split(key, s)

    def step(x, c, i_s, i_sn, e, k, fan):
        """One transition of every node of a level; ``fan`` children per node (static)."""
        batch = x.shape[0]
        sb, snb, eb = (jnp.full((batch,), a, jnp.float32) for a in (i_s, i_sn, e))
        v = jnp.asarray(velocity_fn(x, sb, c), jnp.float32)
        x0 = x0_prediction(x, v, sb)
        mean, std = sde_mean_std(x, v, sb, snb, eb)
        if fan > 1:
            x, v, mean, std, x0 = (jnp.repeat(a, fan, axis=0) for a in (x, v, mean, std, x0))
            sb, snb, eb = (jnp.repeat(a, fan, axis=0) for a in (sb, snb, eb))
            noise = jax.random.normal(k, x.shape, jnp.float32) * jnp.float32(split_noise_scale)
        else:
            noise = jax.random.normal(k, x.shape, jnp.float32)
        x_next = mean + std * noise
        lp = logprob_fn(x, v, x_next, sb, snb, eb)
        return x_next, lp, x0

    levels, lps, ts, x0 = [x_init], [], [], None
    x, i = x_init, 0
    bounds = list(spec.split_steps) + [s]
    for seg_end in bounds:  # steps i..seg_end-1 keep the node count; seg_end (< S) splits
        n_nodes = x.shape[0] // p
        c = _repeat_cond(cond, n_nodes)
        if seg_end > i:
            def body(carry, inp, c=c):
                xx, _ = carry
                i_s, i_sn, e, k = inp
                xn, lp, x0_ = step(xx, c, i_s, i_sn, e, k, 1)
                return (xn, x0_), (xn, lp)

            sl = slice(i, seg_end)
            (x, x0), (xs, lp) = jax.lax.scan(body, (x, x), (sigmas[:-1][sl], sigmas[1:][sl], etas[sl], keys[sl]))
            levels.append(xs.reshape((-1,) + xs.shape[2:]))  # depth-major, like ``nodes``
            lps.append(lp.reshape((-1,) + lp.shape[2:]))
            ts.extend([jnp.full((xs.shape[1],), mask[t]) for t in range(i, seg_end)])
            i = seg_end
        if seg_end < s:
            x, lp, x0 = step(x, c, sigmas[i], sigmas[i + 1], etas[i], keys[i], b)
            levels.append(x)
            lps.append(lp)
            ts.append(jnp.full((x.shape[0],), mask[i]))
            i += 1
    sde_edges = jnp.concatenate(ts)
    return {"nodes": jnp.concatenate(levels, axis=0), "edge_log_probs": jnp.concatenate(lps, axis=0),
            "x0": x0, "sde_edges": sde_edges}


def leaf_paths(nodes: jax.Array, index: TreeIndex) -> jax.Array:
    """``(S+1, P*G, ...)``: every leaf's trajectory (the flat rollout's ``latents`` layout; shared
    prefixes repeated), e.g. for a per-sample trainer or for logging."""
    return jnp.asarray(nodes)[jnp.asarray(index.leaf_ancestor)]


def edge_scalar_logp(edge_log_probs: jax.Array) -> jax.Array:
    """``(E,)`` per-edge log-prob averaged over the latent's elements (what the reference's
    probability-weighted fusion uses)."""
    lp = jnp.asarray(edge_log_probs, jnp.float32)
    return jnp.mean(lp, axis=tuple(range(1, lp.ndim)))


def fuse(leaf_values: jax.Array, spec: TreeSpec, num_prompts: int, *, mode: str = "mean",
         edge_logp: jax.Array | None = None, alpha: float = 1.0) -> jax.Array:
    """Values of every node ``(N, *F)`` from the leaves' ``(P*G, *F)`` (rewards, or maps).

    ``mode="mean"``: each internal node is the mean of its children; ``"prob"``: the softmax over
    its children's ``alpha * edge_logp`` (``(E,)``, see :func:`edge_scalar_logp`) weights them."""
    if mode not in FUSIONS:
        raise ConfigError(f"fusion must be one of {FUSIONS}, got {mode!r}")
    if mode == "prob" and edge_logp is None:
        raise ConfigError("probability-weighted fusion needs the edges' log-probs")
    p, s = int(num_prompts), int(spec.num_steps)
    vals = jnp.asarray(leaf_values, jnp.float32)
    if vals.shape[0] != p * spec.leaves:
        raise ConfigError(f"leaf values have {vals.shape[0]} rows, expected P*G = {p * spec.leaves}")
    idx = tree_index(spec, p)
    n = spec.counts()
    out = [vals]
    cur = vals
    for d in range(s - 1, -1, -1):  # children at depth d+1 -> parents at depth d
        f = spec.fanout(d)
        kids = cur.reshape((p * n[d], f) + cur.shape[1:])
        if f == 1:
            cur = kids[:, 0]
        elif mode == "mean":
            cur = jnp.mean(kids, axis=1)
        else:
            lo, hi = idx.depth_offset[d + 1] - p, idx.depth_offset[d + 2] - p  # edges into depth d+1
            w = jax.nn.softmax(alpha * jnp.asarray(edge_logp, jnp.float32)[lo:hi].reshape(p * n[d], f), axis=1)
            cur = jnp.sum(kids * w.reshape(w.shape + (1,) * (kids.ndim - 2)), axis=1)
        out.append(cur)
    return jnp.concatenate(out[::-1], axis=0)


def depthwise_advantages(node_values: jax.Array, spec: TreeSpec, num_prompts: int, *, eps: float = 1e-8,
                         min_std: float = 1e-6) -> jax.Array:
    """``(N,)`` advantages: per depth and prompt, ``(r - mean) / (std_unbiased + eps)``; 0 where a
    tree has a single node at that depth or the std is below ``min_std``."""
    p, s = int(num_prompts), int(spec.num_steps)
    r = jnp.asarray(node_values, jnp.float32)
    idx = tree_index(spec, p)
    n = spec.counts()
    out = []
    for d in range(s + 1):
        v = r[idx.depth_offset[d]:idx.depth_offset[d + 1]].reshape(p, n[d])
        if n[d] == 1:
            out.append(jnp.zeros((p,), jnp.float32))
            continue
        mean = jnp.mean(v, axis=1, keepdims=True)
        std = jnp.std(v, axis=1, ddof=1, keepdims=True)
        a = jnp.where(std < min_std, 0.0, (v - mean) / (std + eps))
        out.append(a.reshape(-1))
    return jnp.concatenate(out)


def edge_advantages(node_advantages: jax.Array, num_prompts: int) -> jax.Array:
    """``(E, ...)``: each edge takes the advantage of the node it leads to (node ``P + e``)."""
    return jnp.asarray(node_advantages)[int(num_prompts):]


def edge_train_mask(spec: TreeSpec, num_prompts: int, *, sde_edges: jax.Array | None = None,
                    prune_depths: tuple[int, ...] = (), skip_single_node_depths: bool = True) -> jax.Array:
    """``(E,)`` bool: the edges to train. Never the last transition; only SDE edges if
    ``sde_edges`` is given (BranchGRPO-Mix); not edges into a depth in ``prune_depths`` (the
    reference's depth pruning); not edges into depths with one node per tree, whose advantage is
    0 (``skip_single_node_depths``: they add compute and no gradient)."""
    idx = tree_index(spec, num_prompts)
    child_depth = idx.node_depth[int(num_prompts):]
    keep = (idx.edge_t < spec.num_steps - 1) & ~np.isin(child_depth, np.asarray(prune_depths, np.int64))
    if skip_single_node_depths:
        keep &= spec.counts()[child_depth] > 1
    keep = jnp.asarray(keep)
    return keep if sde_edges is None else keep & jnp.asarray(sde_edges, bool)


def static_train_edges(spec: TreeSpec, num_prompts: int, *, sde_steps: tuple[int, ...] | None = None,
                       prune_depths: tuple[int, ...] = (), skip_single_node_depths: bool = True) -> np.ndarray:
    """Indices of the trained edges when the SDE steps are static (``None``: all but the last):
    a fixed-size set a jitted trainer can gather and scan over."""
    idx = tree_index(spec, num_prompts)
    sde = np.ones(spec.num_steps, bool) if sde_steps is None else np.isin(np.arange(spec.num_steps), sde_steps)
    sde[list(spec.split_steps)] = True
    m = np.asarray(edge_train_mask(spec, num_prompts, prune_depths=prune_depths,
                                   skip_single_node_depths=skip_single_node_depths)) & sde[idx.edge_t]
    return np.nonzero(m)[0]


def gather_edges(tree: dict[str, jax.Array], index: TreeIndex, edges: np.ndarray | jax.Array,
                 sigmas: jax.Array) -> dict[str, jax.Array]:
    """The transitions of ``edges`` as a training batch: ``x``, ``x_next``, ``log_probs`` (n, ...),
    ``sigma``, ``sigma_next`` (n,), ``t`` and ``prompt`` (n,) int (cond rows: ``cond[prompt]``)."""
    e = jnp.asarray(edges, jnp.int32)
    p = int(index.depth_offset[1])
    t = jnp.asarray(index.edge_t, jnp.int32)[e]
    sig = jnp.asarray(sigmas, jnp.float32)
    return {"x": tree["nodes"][jnp.asarray(index.edge_parent, jnp.int32)[e]], "x_next": tree["nodes"][p + e],
            "log_probs": tree["edge_log_probs"][e], "sigma": sig[t], "sigma_next": sig[t + 1], "t": t,
            "prompt": jnp.asarray(index.edge_prompt, jnp.int32)[e]}
