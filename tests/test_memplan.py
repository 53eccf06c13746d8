"""Memory-budget rematerialization: fb.checkpoint(memory_budget=...) and fb.memory_plan.

Gradients are compared with ``jax.grad`` of the function without any
checkpoint; the plan's kept bytes with the budget. Compiled figures (temp
bytes, FLOPs, against JAX's checkpoint policies) are in
test_memplan_compiled.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.ad_checkpoint import saved_residuals as jax_saved_residuals  # the oracle

import fbackprop as fb
from fbackprop._src.planning import memcut, memplan
from fbackprop.bench.memplan import (mlp_block, mlp_params, stack_of, transformer_block,
                                     transformer_params)

P = jax.checkpoint_policies


def _loss(region):
    return lambda params, x: jnp.mean(region(params, x) ** 2)


def _close(got, want, rtol=1e-4, atol=1e-6):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _jax_grad(fun, argnums=0):
    return jax.jit(jax.grad(fun, argnums))


def _plan(loss, *args):
    plans = fb.saved_residuals(loss, *args).plans
    assert len(plans) == 1
    return plans[0]


@pytest.fixture(scope="module")
def transformer():
    params, x = transformer_params(blocks=2, seq=8, width=8)
    return stack_of(transformer_block), params, x


@pytest.fixture(scope="module")
def mlp():
    params, x = mlp_params(layers=8, width=8, hidden=16, batch=4)
    return stack_of(mlp_block), params, x


# ------------------------------------------------------------------ the argument
@pytest.mark.parametrize("bad, error", [
    ("1MB", TypeError), (True, TypeError), ([1], TypeError), (0, ValueError),
    (-3, ValueError), (0.0, ValueError), (1.5, ValueError), (-0.5, ValueError),
    (float("nan"), ValueError)])
def test_bad_budgets_are_errors_naming_the_argument_and_value(bad, error):
    with pytest.raises(error, match="memory_budget") as info:
        fb.checkpoint(jnp.sin, memory_budget=bad)
    assert repr(bad)[:6] in str(info.value) or str(bad) in str(info.value)


def test_budget_and_policy_are_exclusive():
    with pytest.raises(ValueError, match="either `policy` or `memory_budget`"):
        fb.checkpoint(jnp.sin, policy=P.dots_saveable, memory_budget=0.5)


def test_budget_policy_is_hashable_and_compares_by_value():
    assert memplan.MemoryBudget(0.5) == memplan.MemoryBudget(0.5)
    assert memplan.MemoryBudget(1) != memplan.MemoryBudget(1.0)    # 1 byte vs 100%
    assert len({memplan.MemoryBudget(0.5), memplan.MemoryBudget(0.5)}) == 1
    assert repr(memplan.MemoryBudget(1024)) == "memory_budget(1024)"


# ------------------------------------------------------------------- gradients
def test_scan_region_gradients_match_jax(transformer):
    stack, params, x = transformer
    want = _jax_grad(_loss(stack), (0, 1))(params, x)
    loss = _loss(fb.checkpoint(stack, memory_budget=0.4))
    _close(jax.jit(fb.grad(loss, (0, 1)))(params, x), want)


@pytest.mark.parametrize("reverse", [False, True])
def test_split_scan_steps_gradients_match_jax(mlp, reverse):
    # The MLP's body has two plans only (keep tanh's output, or recompute it),
    # so a budget between them runs the scan as two segments.
    _, params, x = mlp

    def stack(params, x):
        return lax.scan(lambda h, p: (mlp_block(h, p), h.sum()), x, params,
                        reverse=reverse)

    def loss_of(region):
        def loss(params, x):
            y, ys = region(params, x)
            return jnp.mean(y ** 2) + jnp.sum(jnp.sin(ys))
        return loss

    want = _jax_grad(loss_of(stack), (0, 1))(params, x)
    loss = loss_of(fb.checkpoint(stack, memory_budget=0.5))
    _close(jax.jit(fb.grad(loss, (0, 1)))(params, x), want)
    plan = _plan(loss, params, x)
    assert plan.kept_bytes <= plan.budget_bytes
    assert any("of the 8 steps" in r.detail for r in plan.recomputed)


def test_scan_body_and_unrolled_regions_match_jax(mlp):
    _, params, x = mlp
    # the body as the region: the budget is per call, i.e. per step
    block = fb.checkpoint(lambda h, p: (mlp_block(h, p), None), memory_budget=0.5)

    def scanned(params, x):
        return jnp.mean(lax.scan(block, x, params)[0] ** 2)

    plain = _loss(stack_of(mlp_block))
    _close(jax.jit(fb.grad(scanned, (0, 1)))(params, x), _jax_grad(plain, (0, 1))(params, x))
    plan = _plan(scanned, params, x)
    assert plan.kept_bytes <= plan.budget_bytes and plan.plain_bytes == 4 * 16 * 4

    def unrolled(params, x):
        for i in range(3):
            x = mlp_block(x, jax.tree_util.tree_map(lambda a: a[i], params))
        return x

    loss = _loss(fb.checkpoint(unrolled, memory_budget=0.4))
    _close(jax.jit(fb.grad(loss, (0, 1)))(params, x), _jax_grad(_loss(unrolled), (0, 1))(params, x))


def test_second_order_through_a_budgeted_region(mlp):
    stack, params, x = mlp
    v = jnp.ones_like(x)
    ours = jax.jit(fb.grad(lambda x: jnp.vdot(fb.grad(_loss(fb.checkpoint(
        stack, memory_budget=0.5)), 1)(params, x), v)))(x)
    want = jax.jit(jax.grad(lambda x: jnp.vdot(jax.grad(_loss(stack), 1)(params, x), v)))(x)
    _close(ours, want, rtol=1e-3, atol=1e-5)


def test_nested_checkpoints_and_scans_are_planned_with_the_region(mlp):
    _, params, x = mlp
    inner = jax.checkpoint(mlp_block, policy=P.dots_saveable)
    nested_budget = fb.checkpoint(mlp_block, memory_budget=0.9)

    def region(params, x, inner=inner, nested_budget=nested_budget):
        # a scan of scans (2 x 4 layers), one layer under its own policy, one
        # under its own budget
        grouped = jax.tree_util.tree_map(lambda a: a.reshape(2, 4, *a.shape[1:]), params)

        def group(h, ps):
            return lax.scan(lambda h, p: (mlp_block(h, p), None), h, ps)[0], None

        h = lax.scan(group, x, grouped)[0]
        first = jax.tree_util.tree_map(lambda a: a[0], params)
        return nested_budget(inner(h, first), first)

    def plain(params, x):
        grouped = jax.tree_util.tree_map(lambda a: a.reshape(2, 4, *a.shape[1:]), params)

        def group(h, ps):
            return lax.scan(lambda h, p: (mlp_block(h, p), None), h, ps)[0], None

        h = lax.scan(group, x, grouped)[0]
        first = jax.tree_util.tree_map(lambda a: a[0], params)
        return mlp_block(mlp_block(h, first), first)

    loss = _loss(fb.checkpoint(region, memory_budget=0.4))
    _close(jax.jit(fb.grad(loss, (0, 1)))(params, x), _jax_grad(_loss(plain), (0, 1))(params, x))
    plan = _plan(loss, params, x)
    assert plan.kept_bytes <= plan.budget_bytes
    # the nested checkpoints are inlined: "plain" is the region without any checkpoint
    assert plan.plain_bytes == fb.memory_plan(plain, params, x, budgets=[1.0]).plain_bytes
    assert any("x4" in r.detail or "steps" in r.detail for r in plan.recomputed)


def test_jax_autodiff_sees_nothing_saveable(mlp):
    stack, params, x = mlp
    budgeted = _loss(fb.checkpoint(stack, memory_budget=0.5))
    nothing = _loss(jax.checkpoint(stack, policy=P.nothing_saveable))
    _close(_jax_grad(budgeted)(params, x), _jax_grad(_loss(stack))(params, x))

    def shapes(f):
        return sorted(tuple(a.shape) for a, _ in jax_saved_residuals(f, params, x))
    assert shapes(budgeted) == shapes(nothing)


# ------------------------------------------------------------------- the plans
def test_kept_bytes_within_budget_and_recompute_falls_with_it(transformer):
    stack, params, x = transformer
    curve = fb.memory_plan(stack, params, x, budgets=[0.0, 0.25, 0.5, 0.75, 1.0])
    kept = [p.kept_bytes for p in curve.points]
    flops = [p.recompute_flops for p in curve.points]
    assert not curve.points[0].feasible          # 0 bytes: below the stacked carries
    for p in curve.points[1:]:
        assert p.feasible and p.kept_bytes <= p.budget_bytes
    assert kept == sorted(kept) and flops == sorted(flops, reverse=True)
    assert curve.points[0].kept_bytes == curve.min_bytes > 0       # the stacked carries
    assert curve.points[-1].kept_bytes == curve.plain_bytes and flops[-1] == 0
    assert flops[0] == pytest.approx(curve.recompute_all_flops)
    # at half the bytes, far less than recomputing everything
    assert flops[2] < 0.25 * curve.recompute_all_flops
    # the plan fb.checkpoint makes is the curve's
    plan = _plan(_loss(fb.checkpoint(stack, memory_budget=0.5)), params, x)
    assert (plan.kept_bytes, plan.budget_bytes, plan.plain_bytes) == (
        kept[2], curve.points[2].budget_bytes, curve.plain_bytes)
    assert plan.recompute_flops == pytest.approx(flops[2])


def test_no_hand_policy_beats_the_plan_at_its_bytes(transformer, mlp):
    for stack, params, x in (transformer, mlp):
        curve = fb.memory_plan(stack, params, x, budgets=[k / 10 for k in range(11)])
        for name, pol in curve.policies.items():
            fits = [p for p in curve.points if p.budget_bytes >= pol.kept_bytes]
            if fits:
                assert fits[0].recompute_flops <= pol.recompute_flops + 1e-6, name


def test_int_budget_and_full_budget(mlp):
    stack, params, x = mlp
    plain = fb.memory_plan(stack, params, x, budgets=[1.0]).plain_bytes
    plan = _plan(_loss(fb.checkpoint(stack, memory_budget=plain // 3)), params, x)
    assert plan.budget_bytes == plain // 3 and plan.kept_bytes <= plain // 3
    assert f"{plain // 3:,} bytes" in plan.describe()
    full = _plan(_loss(fb.checkpoint(stack, memory_budget=1.0)), params, x)
    assert full.kept_bytes == full.plain_bytes == plain
    assert full.recompute_flops == 0 and full.recomputed == ()


def test_budget_below_the_smallest_plan_names_both_numbers(mlp):
    stack, params, x = mlp
    curve = fb.memory_plan(stack, params, x, budgets=[0.0])
    least = curve.min_bytes
    assert least > 100
    for budget in (100, 0.01):
        loss = _loss(fb.checkpoint(stack, memory_budget=budget))
        with pytest.raises(ValueError) as info:
            fb.grad(loss)(params, x)
        text = str(info.value)
        assert f"memory_budget={budget!r}" in text
        assert f"smallest plan keeps {least:,} bytes" in text
        assert "carries" in text


def test_memory_plan_marks_budgets_below_the_smallest_plan(mlp):
    stack, params, x = mlp
    curve = fb.memory_plan(stack, params, x, budgets=[0.0, 100, 0.5, 1.0])
    least = curve.min_bytes
    assert [p.feasible for p in curve.points] == [False, False, True, True]
    lines = str(curve).splitlines()
    assert f"the smallest plan keeps {least:,}" in lines[0]
    for budget in ("0", "100"):
        row = next(line for line in lines if line.split()[:1] == [budget])
        assert "infeasible" in row and f"{least:,} bytes" in row
    # fb.checkpoint refuses exactly those budgets, and accepts the smallest plan's bytes
    with pytest.raises(ValueError, match=f"smallest plan keeps {least:,} bytes"):
        fb.grad(_loss(fb.checkpoint(stack, memory_budget=least - 1)))(params, x)
    assert _plan(_loss(fb.checkpoint(stack, memory_budget=least)), params, x).kept_bytes == least
    assert fb.memory_plan(stack, params, x, budgets=[least - 1, least]).points[1].feasible
    assert [p["feasible"] for p in curve.as_dicts()["points"]] == [False, False, True, True]


def test_memory_plan_default_budgets_start_at_the_smallest_plan(mlp):
    stack, params, x = mlp
    curve = fb.memory_plan(stack, params, x)
    budgets = [p.budget_bytes for p in curve.points]
    assert budgets[0] == curve.min_bytes and budgets[-1] == curve.plain_bytes
    assert budgets == sorted(set(budgets)) and all(p.feasible for p in curve.points)
    assert len(budgets) >= 5


def test_memory_plan_table_columns_line_up(transformer):
    stack, params, x = transformer
    curve = fb.memory_plan(stack, params, x, budgets=[0.0, 0.5, 1.0])
    lines = str(curve).splitlines()
    header = lines[1]
    assert header.split() == ["budget", "(bytes)", "kept", "bytes", "kept/plain",
                              "recompute", "FLOPs", "of", "all"]
    rows = [line for line in lines[2:] if "infeasible" not in line and not line.endswith(":")]
    assert len(rows) == 2 + 3                     # two feasible budgets, three policies
    assert any(line.startswith("dots_with_no_batch_dims_saveable ") for line in rows)
    # every number column ends where its header ends
    for title in ("kept bytes", "kept/plain", "recompute FLOPs", "of all"):
        end = header.index(title) + len(title)
        for line in rows:
            assert line[end - 1] != " " and (len(line) == end or line[end] == " "), (title, line)


def test_saved_residuals_shows_the_plan(transformer):
    stack, params, x = transformer
    loss = _loss(fb.checkpoint(stack, memory_budget=0.4))
    rows = fb.saved_residuals(loss, params, x)
    plan = rows.plans[0]
    text = str(rows)
    assert "memory budget plan for the checkpoint at" in text and "test_memplan.py" in text
    assert "budget 0.4 x" in text and "recomputes" in text and "FLOPs" in text
    assert "kept:" in text and "recomputed:" in text
    assert plan.kept and sum(r.nbytes for r in plan.kept) == plan.kept_bytes
    assert plan.recomputed and all(r.flops >= 0 for r in plan.recomputed)
    assert plan.recompute_flops == pytest.approx(sum(r.flops for r in plan.recomputed))
    assert 0 < plan.recompute_flops < plan.recompute_all_flops
    assert plan.search_seconds <= plan.seconds
    # the table's rows include the region's kept values
    assert rows.intermediate_bytes >= plan.kept_bytes


def test_explain_marks_recomputed_rows():
    def f(w, x):
        layer = fb.checkpoint(lambda w, x: jnp.tanh(jnp.tanh(x @ w) @ w), memory_budget=0.5)
        return jnp.sum(layer(w, x) ** 2)

    w, x = jnp.full((3, 3), 0.1), jnp.ones((2, 3))
    ex = fb.explain(f, w, x)
    ops = [r.primitive for r in ex.rows]
    assert ops == ["dot_general", "tanh", "dot_general", "tanh", "integer_pow", "reduce_sum"]
    marked = [r.index for r in ex.rows if r.recomputed]
    assert len(marked) == 2 and "↻" in ex.table() and "recomputes" in ex.table()
    _close([i.grad for i in ex.inputs], jax.grad(lambda w, x: jnp.sum(
        jnp.tanh(jnp.tanh(x @ w) @ w) ** 2), (0, 1))(w, x))
    assert "recomputed in the backward sweep" in ex.to_dot()
    # a checkpoint with a policy: nothing_saveable recomputes the first sin only
    g = jax.checkpoint(lambda x: jnp.sin(jnp.sin(x)) * 2.0)
    ex = fb.explain(lambda x: jnp.sum(g(x) ** 2), jnp.ones(3))
    assert [(r.primitive, bool(r.recomputed)) for r in ex.rows[:3]] == [
        ("sin", True), ("sin", False), ("mul", False)]


def test_memory_plan_table_dicts_and_plot(tmp_path, transformer):
    stack, params, x = transformer
    curve = fb.memory_plan(stack, params, x, budgets=[0.2, 0.6, 1000], policies=[
        "dots_saveable"])
    assert [p.budget_bytes for p in curve.points][0] == 1000
    text = str(curve)
    assert "memory plan of stack" in text and "dots_saveable" in text
    d = curve.as_dicts()
    assert set(d) >= {"plain_bytes", "min_bytes", "points", "hull", "policies"}
    assert len(curve.hull) >= 3 and curve.hull[0].kept_bytes == curve.plain_bytes
    with pytest.raises(ValueError, match="fraction"):
        fb.memory_plan(stack, params, x, budgets=[1.5])
    with pytest.raises(TypeError, match="budget"):
        fb.memory_plan(stack, params, x, budgets=["half"])
    pytest.importorskip("matplotlib")
    path = tmp_path / "curve.png"
    curve.plot(path=str(path))
    assert path.stat().st_size > 0


def test_planning_a_1000_layer_network_takes_well_under_a_second():
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.normal(size=(8, 8)) / 3, jnp.float32) for _ in range(1000)]

    def net(ws, x):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x

    curve = fb.memory_plan(net, ws, jnp.ones((4, 8)), budgets=[0.25, 0.5], policies=())
    assert curve.seconds < 1.0, curve.seconds
    half = curve.points[1]
    assert half.kept_bytes <= half.budget_bytes
    assert half.recompute_flops <= 0.51 * curve.recompute_all_flops


def test_greedy_fallback_for_huge_graphs(monkeypatch, mlp):
    stack, params, x = mlp
    monkeypatch.setattr(memcut, "MAX_CUT_NODES", 0)

    def region(params, x):    # a new function: a plan of its own
        return stack(params, x)

    loss = _loss(fb.checkpoint(region, memory_budget=0.6))
    _close(jax.jit(fb.grad(loss))(params, x), _jax_grad(_loss(stack))(params, x))
    plan = _plan(loss, params, x)
    assert plan.kept_bytes <= plan.budget_bytes


def test_the_module_docstring_states_the_algorithm():
    doc = memplan.__doc__
    for phrase in ("min-cut", "max-flow", "hull", "knapsack", "greedy", "MAX_CUT_NODES"):
        assert phrase in doc, phrase
    assert re.search(r"nothing_saveable", fb.checkpoint.__doc__)
