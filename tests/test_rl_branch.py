"""BranchGRPO tree rollouts on a tiny linear velocity field, against an explicit numpy tree (node
objects, as the reference code builds it): layout, sampling, log-probs, reward fusion, depth-wise
advantages, pruning masks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.utils import assert_close
from vipo_jax.errors import ConfigError
from vipo_jax.rl import branch as BR
from vipo_jax.rl.schedule import sigma_schedule
from vipo_jax.rl.sde import transition_logprob

A, C = -0.4, 0.3


def velocity(x, sigma, cond):
    """Linear in x: v = A x + C sigma + b_prompt."""
    return A * x + C * sigma[:, None, None, None] + cond["b"][:, None, None, None]


# ----------------------------------------------------------------------------- numpy reference tree
class Node:
    def __init__(self, x, parent=None, depth=0, prompt=0, logp=None):
        self.x, self.parent, self.depth, self.prompt, self.logp = x, parent, depth, prompt, logp
        self.children, self.reward, self.adv = [], None, None

    def leaves(self):
        return [self] if not self.children else [lf for c in self.children for lf in c.leaves()]


def np_tree(x_init, bvec, sigmas, eta, spec, noises, scale, sde):
    """Explicit tree; ``noises[i]`` is step i's (P*n_{i+1}, ...) noise, child-indexed."""
    s = np.asarray(sigmas, np.float64)
    p = x_init.shape[0]
    roots = [Node(np.asarray(x_init[k], np.float64), prompt=k) for k in range(p)]
    level = [[r] for r in roots]  # per prompt, nodes of the current depth in tree order
    for i in range(spec.num_steps):
        f = spec.fanout(i)
        stochastic = (sde[i] or f > 1) and i < spec.num_steps - 1
        e = eta if stochastic else 0.0
        new = []
        for k in range(p):
            row = []
            for c, node in enumerate(level[k]):
                x = node.x
                v = A * x + C * s[i] + bvec[k]
                x0 = x - s[i] * v
                score = -(x - (1 - s[i]) * x0) / s[i] ** 2
                mean = x + (s[i + 1] - s[i]) * v - 0.5 * e**2 * score * (s[i + 1] - s[i])
                std = e * math.sqrt(s[i] - s[i + 1])
                for j in range(f):
                    idx = k * len(level[k]) * f + c * f + j
                    z = np.asarray(noises[i][idx], np.float64) * (scale if f > 1 else 1.0)
                    xn = mean + std * z
                    lp = (-((xn - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
                          if std > 0 else np.zeros_like(xn))
                    child = Node(xn, node, node.depth + 1, k, lp)
                    node.children.append(child)
                    row.append(child)
            new.append(row)
        level = new
    return roots


def by_depth(roots, s):
    """Nodes in the module's layout: depth-major, prompt-major, tree order."""
    out = []
    for d in range(s + 1):
        for r in roots:
            stack = [r]
            for _ in range(d):
                stack = [c for n in stack for c in n.children]
            out.extend(stack)
    return out


def np_fuse(roots, leaf_rewards, mode):
    for k, r in enumerate(roots):
        for j, lf in enumerate(r.leaves()):
            lf.reward = leaf_rewards[k * len(r.leaves()) + j]

    def rec(n):
        if not n.children:
            return n.reward
        rs = [rec(c) for c in n.children]
        if mode == "mean":
            n.reward = float(np.mean([lf.reward for lf in n.leaves()]))  # mean of leaf descendants
        else:
            lps = np.asarray([np.mean(c.logp) for c in n.children])
            w = np.exp(lps - lps.max())
            w /= w.sum()
            n.reward = float(np.sum(w * np.asarray(rs)))
        return n.reward

    for r in roots:
        rec(r)


def np_depth_adv(roots, s):
    for r in roots:
        for d in range(s + 1):
            nodes = [r]
            for _ in range(d):
                nodes = [c for n in nodes for c in n.children]
            if len(nodes) == 1:
                nodes[0].adv = 0.0
                continue
            rw = np.asarray([n.reward for n in nodes])
            sd = rw.std(ddof=1)
            a = np.zeros_like(rw) if sd < 1e-6 else (rw - rw.mean()) / (sd + 1e-8)
            for n, v in zip(nodes, a):
                n.adv = float(v)


# ----------------------------------------------------------------------------- cases
SPEC = BR.TreeSpec(num_steps=6, split_steps=(1, 3), branch=2)
P, SHAPE, ETA = 2, (3, 3, 2), 0.5


@pytest.fixture(scope="module", params=[(1.0, None), (4.0, None), (1.0, "mix")])
def case(request):
    scale, mix = request.param
    sigmas = sigma_schedule(SPEC.num_steps, 3.0)
    x_init = jax.random.normal(jax.random.key(0), (P,) + SHAPE, jnp.float32)
    cond = {"b": jnp.asarray([0.1, -0.2], jnp.float32)}
    sde = np.ones(SPEC.num_steps, bool) if mix is None else np.isin(np.arange(SPEC.num_steps), (2,))
    key = jax.random.key(1)
    fn = jax.jit(lambda x, c, k, m: BR.tree_rollout(velocity, x, c, sigmas, ETA, k, SPEC, split_noise_scale=scale,
                                                    sde_mask=m))
    tree = fn(x_init, cond, key, jnp.asarray(sde))
    keys = jax.random.split(key, SPEC.num_steps)
    noises = [np.asarray(jax.random.normal(keys[i], (P * SPEC.nodes_at(i + 1),) + SHAPE, jnp.float32))
              for i in range(SPEC.num_steps)]
    roots = np_tree(np.asarray(x_init), np.asarray(cond["b"]), sigmas, ETA, SPEC, noises, scale, sde)
    return sigmas, x_init, cond, tree, roots, sde


def test_spec_and_layout():
    assert SPEC.leaves == 4
    np.testing.assert_array_equal(SPEC.counts(), [1, 1, 2, 2, 4, 4, 4])
    idx = BR.tree_index(SPEC, P)
    n_nodes = P * SPEC.counts().sum()
    assert idx.depth_offset[-1] == n_nodes and idx.edge_parent.shape == (n_nodes - P,)
    assert idx.leaf_ancestor.shape == (SPEC.num_steps + 1, P * 4)
    for bad in [dict(split_steps=()), dict(split_steps=(5,)), dict(split_steps=(2, 1)), dict(split_steps=(1, 1)),
                dict(split_steps=(1,), branch=1)]:
        with pytest.raises(ConfigError):
            BR.TreeSpec(num_steps=6, **{"branch": 2, **bad})
    # the reference recipe: 20 steps, splits 0,3,6,9, b=2 -> G=16
    ref = BR.TreeSpec(20, (0, 3, 6, 9), 2)
    assert ref.leaves == 16 and int(ref.counts()[1:].sum()) == 3 * 2 + 3 * 4 + 3 * 8 + 11 * 16


def test_tree_matches_numpy(case):
    sigmas, x_init, cond, tree, roots, sde = case
    ref = by_depth(roots, SPEC.num_steps)
    idx = BR.tree_index(SPEC, P)
    assert tree["nodes"].shape == (len(ref),) + SHAPE
    for j, n in enumerate(ref):
        assert_close(tree["nodes"][j], n.x, rel=1e-5, what=f"node {j}")
        assert idx.node_depth[j] == n.depth and idx.node_prompt[j] == n.prompt
        if j >= P:
            assert ref[idx.edge_parent[j - P]] is n.parent, f"parent of node {j}"
            assert idx.edge_t[j - P] == n.depth - 1
            assert_close(tree["edge_log_probs"][j - P], n.logp, rel=2e-4, what=f"logp edge {j - P}")
    leaves = [lf for r in roots for lf in r.leaves()]
    lat = BR.leaf_paths(tree["nodes"], idx)
    for k, lf in enumerate(leaves):
        path = []
        n = lf
        while n is not None:
            path.append(n.x)
            n = n.parent
        assert_close(lat[:, k], np.stack(path[::-1]), rel=1e-5, what=f"leaf path {k}")
    assert_close(tree["x0"], np.stack([lf.x for lf in leaves]), rel=1e-5, what="x0 = leaves (last step is ODE)")


def test_shared_prefix_and_branches(case):
    sigmas, x_init, cond, tree, roots, sde = case
    lat = np.asarray(BR.leaf_paths(tree["nodes"], BR.tree_index(SPEC, P)))
    g = SPEC.leaves
    for p in range(P):
        grp = lat[:, p * g:(p + 1) * g]
        assert np.all(grp[:2] == grp[:2, :1])  # depths 0, 1: one node
        assert np.all(grp[2:4, :2] == grp[2:4, :1]) and np.all(grp[2:4, 2:] == grp[2:4, 2:3])
        assert np.abs(grp[2, 0] - grp[2, 2]).max() > 1e-3  # the first split separates
        assert np.abs(grp[4, 0] - grp[4, 1]).max() > 1e-3  # the second split separates


def test_edge_logprobs_are_the_training_recomputation(case):
    sigmas, x_init, cond, tree, roots, sde = case
    idx = BR.tree_index(SPEC, P)
    edges = np.arange(idx.edge_parent.shape[0])
    batch = BR.gather_edges(tree, idx, edges, sigmas)
    b = jnp.asarray(cond["b"])[batch["prompt"]]
    n = edges.shape[0]
    etas = jnp.where(tree["sde_edges"], ETA, 0.0)
    lp = transition_logprob(batch["x"], velocity(batch["x"], batch["sigma"], {"b": b}), batch["x_next"],
                            batch["sigma"], batch["sigma_next"], etas)
    assert lp.shape == (n,) + SHAPE
    assert_close(lp, tree["edge_log_probs"], rel=1e-5, what="recomputed edge log-probs")
    sde_expect = (np.asarray(sde) | np.isin(np.arange(SPEC.num_steps), SPEC.split_steps))
    sde_expect &= np.arange(SPEC.num_steps) < SPEC.num_steps - 1
    np.testing.assert_array_equal(np.asarray(tree["sde_edges"]), sde_expect[idx.edge_t])
    assert float(jnp.max(jnp.abs(tree["edge_log_probs"][~np.asarray(tree["sde_edges"])]))) == 0.0


@pytest.mark.parametrize("mode", ["mean", "prob"])
def test_fusion_and_depthwise_advantages(case, mode):
    sigmas, x_init, cond, tree, roots, sde = case
    leaf_r = np.asarray(jax.random.normal(jax.random.key(7), (P * SPEC.leaves,)), np.float64)
    lp = BR.edge_scalar_logp(tree["edge_log_probs"])
    node_r = BR.fuse(jnp.asarray(leaf_r, jnp.float32), SPEC, P, mode=mode, edge_logp=lp)
    np_fuse(roots, leaf_r, mode)
    ref = by_depth(roots, SPEC.num_steps)
    assert_close(node_r, np.asarray([n.reward for n in ref]), rel=1e-5, what=f"fused rewards ({mode})")
    if mode == "prob":  # the weighting matters (edge log-probs differ between siblings)
        plain = BR.fuse(jnp.asarray(leaf_r, jnp.float32), SPEC, P)
        assert float(jnp.max(jnp.abs(node_r - plain))) > 1e-3
    adv = BR.depthwise_advantages(node_r, SPEC, P)
    np_depth_adv(roots, SPEC.num_steps)
    assert_close(adv, np.asarray([n.adv for n in ref]), rel=1e-4, what="depth-wise advantages")
    e_adv = BR.edge_advantages(adv, P)
    assert_close(e_adv, np.asarray([n.adv for n in ref[P:]]), rel=1e-4)
    # per-position values (maps) fuse the same way, position by position
    maps = jax.random.uniform(jax.random.key(8), (P * SPEC.leaves, 3, 3))
    fm = BR.fuse(maps, SPEC, P, mode=mode, edge_logp=lp)
    assert fm.shape == (tree["nodes"].shape[0], 3, 3)
    for pos in [(0, 0), (2, 1)]:
        one = BR.fuse(maps[:, pos[0], pos[1]], SPEC, P, mode=mode, edge_logp=lp)
        assert_close(fm[:, pos[0], pos[1]], one, rel=1e-6)


def test_all_splits_at_the_root_is_flat_grpo():
    """Splitting every branch at step 0 gives G independent trajectories from a shared start: at
    every depth >= 1 the fused rewards are the leaf rewards and the advantages GRPO's."""
    with pytest.raises(ConfigError):
        BR.TreeSpec(num_steps=4, split_steps=(0, 3), branch=2)
    spec = BR.TreeSpec(num_steps=4, split_steps=(0,), branch=4)
    r = np.asarray(jax.random.normal(jax.random.key(9), (3 * 4,)), np.float64)
    adv = np.asarray(BR.depthwise_advantages(BR.fuse(jnp.asarray(r, jnp.float32), spec, 3), spec, 3))
    g = r.reshape(3, 4)
    grpo = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-8)).reshape(-1)
    idx = BR.tree_index(spec, 3)
    np.testing.assert_array_equal(adv[:3], 0.0)
    for d in range(1, 5):
        assert_close(adv[idx.depth_offset[d]:idx.depth_offset[d + 1]], grpo, rel=1e-5, what=f"depth {d}")


def test_constant_rewards_give_zero_advantages():
    r = jnp.ones((P * SPEC.leaves,))
    adv = BR.depthwise_advantages(BR.fuse(r, SPEC, P), SPEC, P)
    np.testing.assert_array_equal(np.asarray(adv), 0.0)


def test_train_masks_and_gather(case):
    sigmas, x_init, cond, tree, roots, sde = case
    idx = BR.tree_index(SPEC, P)
    m = np.asarray(BR.edge_train_mask(SPEC, P))
    # trainable: t = 1..4 (t = 0 leads to the single-node depth 1, t = 5 is the ODE step to 0)
    assert m.sum() == P * (2 + 2 + 4 + 4) and set(idx.edge_t[m]) == {1, 2, 3, 4}
    m_all = np.asarray(BR.edge_train_mask(SPEC, P, skip_single_node_depths=False))
    assert m_all.sum() == P * (1 + 2 + 2 + 4 + 4)
    pruned = np.asarray(BR.edge_train_mask(SPEC, P, prune_depths=(5,)))
    assert pruned.sum() == P * (2 + 2 + 4) and 4 not in set(idx.edge_t[pruned])
    mix = np.asarray(BR.edge_train_mask(SPEC, P, sde_edges=tree["sde_edges"]))
    assert np.all(np.asarray(tree["sde_edges"])[mix])
    st = BR.static_train_edges(SPEC, P, sde_steps=(2,))
    assert set(idx.edge_t[st]) == {1, 2, 3}
    np.testing.assert_array_equal(BR.static_train_edges(SPEC, P), np.nonzero(m)[0])
    batch = BR.gather_edges(tree, idx, st, sigmas)
    assert batch["x"].shape == (st.shape[0],) + SHAPE
    np.testing.assert_array_equal(np.asarray(batch["sigma"]), np.asarray(sigmas)[idx.edge_t[st]])
    np.testing.assert_array_equal(np.asarray(batch["prompt"]), idx.edge_prompt[st])
    np.testing.assert_array_equal(np.asarray(batch["x_next"]), np.asarray(tree["nodes"])[P + st])


def test_bad_inputs():
    sigmas = sigma_schedule(SPEC.num_steps, 3.0)
    x = jnp.zeros((P,) + SHAPE)
    cond = {"b": jnp.zeros((P,))}
    with pytest.raises(ConfigError):
        BR.tree_rollout(velocity, x, cond, sigmas[:-1], ETA, jax.random.key(0), SPEC)
    with pytest.raises(ConfigError):
        BR.fuse(jnp.zeros((P * SPEC.leaves + 1,)), SPEC, P)
    with pytest.raises(ConfigError):
        BR.fuse(jnp.zeros((P * SPEC.leaves,)), SPEC, P, mode="prob")
