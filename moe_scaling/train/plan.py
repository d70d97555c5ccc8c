"""Memory plan of a train step, allocating nothing: ``moe-train TARGET --plan``.

:func:`memory_plan` builds the train state with :func:`flax.nnx.eval_shape` (shapes only), the
batch as :class:`jax.ShapeDtypeStruct`, places both on the stage's mesh
(:mod:`moe_scaling.train.mesh`), lowers and compiles the jitted step and reads XLA's memory
analysis of the partitioned program, i.e. per device:

* ``params`` / ``optimizer``: the shards of the model and of the AdamW state (moments, counts)
  on one device, from the compiled input shardings;
* ``temporaries``: XLA's temp buffers (activations kept for the backward pass, gradients,
  gathered FSDP weights, the dispatch buffers of the MoE layers);
* ``total``: arguments + outputs not aliased to them (the state is donated) + temporaries.

Beside it, :func:`analytic_estimate` counts the same from the model config, the mesh and the
batch, term by term (``n`` devices, ``T_l = B S / n`` tokens per device, ``cb`` bytes of the
compute dtype):

* ``params``: 4 bytes per parameter of this device's shard: the routed experts split over
  ``fsdp x expert``, everything else over ``fsdp`` (the partition rules of
  :mod:`moe_scaling.train.mesh`);
* ``optimizer``: 2 x ``params`` (AdamW's two float32 moments); ``gradients``: 1 x ``params``;
* ``activations`` kept for the backward pass, per token and layer: the residual stream and the two
  norms' inputs (float32), q/k/v and the attention output, the causal scores and their softmax
  (float32, half the ``S x S`` square per head); per MoE layer the shared SwiGLU's input/output
  and the router's logits and probabilities, plus the routed rows: ``E C_l`` capacity slots
  (``C_l = capacity(T_l, k, E, cf)``, the token-local dispatch's layout; ``T_l k`` rows for a
  dropless one), each keeping its input (``d``), gate/up (``2 f``) and SwiGLU output (``f``);
* ``logits``: ``T_l x V`` float32, twice (the logits and their softmax);
* ``gathered_weights`` (``fsdp > 1``): the whole model divided only by ``expert``, less this
  device's shard: XLA keeps every weight it all-gathers in the forward pass until the backward pass
  has used it. This term was added after seeing XLA's 8-device number (README), so agreement there
  is partly fitted; it is still a count of the model and the mesh, not a number taken from XLA.

``total_regathered`` is what a schedule that gathers one layer at a time (rematerialising in the
backward) would need. Compilation happens on CPU host devices when the mesh is larger than the
machine (the CLI sets ``--xla_force_host_platform_device_count`` before JAX starts), so the
temporaries are XLA:CPU's; an accelerator's compiler fuses differently.

Measured with the token-local dispatch (bench/plans/, batch 64 x 1024 on 64 devices): MobileMoE-L
on ``fsdp=16,expert=4`` 20.7 GB per device, 1.26 x the estimate; the 2 GB sweet spot on
``fsdp=32,expert=2`` 17.8 GB, 1.17 x. (With the old global dispatch, every device held the routed
activations of the whole batch divided only by ``expert``: 57.3 and 69.3 GB.) The rest of the gap
was not broken down; candidates the estimate leaves out are the full-size gradients of gathered
weights before their reduce-scatter (the tied embedding's, ``4 V d``, could live through the whole
backward pass) and further float32 copies around the logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_scaling.config import MeshShape, ModelConfig

__all__ = ["memory_plan", "compile_step", "step_flops", "analytic_estimate", "format_plan"]


def _shard_bytes(abstract: Any, shardings: Any) -> int:
    import jax
    total = 0
    for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(a.shape), dtype=np.int64)) * np.dtype(a.dtype).itemsize
    return total


def analytic_estimate(model: ModelConfig, mesh: MeshShape, batch_size: int, seq_len: int,
                      dtype: str = "float32", capacity_factor: float | None = None) -> dict[str, int]:
    """Per-device bytes of a train step from the config (see the module docstring).

    Routed rows per MoE layer and device: ``T_l k`` for a dropless dispatch, or, with
    ``capacity_factor`` (the ``capacity`` dispatch, token-local on a mesh), the ``E C_l`` slots
    of the capacity layout, ``C_l = capacity(T_l, k, E, cf)`` with ``T_l = B S / n`` the device's
    tokens (:func:`moe_scaling.model.routing.capacity`; padding slots are computed like real
    ones). Each row keeps its input (``d``), gate/up (``2 f``) and SwiGLU output (``f``) for
    the backward pass."""
    d, L, V = model.d_model, model.n_layers, model.vocab_size
    hq, hkv, hd = model.n_heads, model.n_kv_heads, model.head_dim
    attn = d * (hq + 2 * hkv) * hd + hq * hd * d + (2 * hd if model.qk_norm else 0) + 2 * d
    expert = 3 * d * model.d_expert                         # one routed SwiGLU expert
    moe_layers, dense_layers = model.n_moe_layers, L - model.n_moe_layers
    shared = 3 * d * model.n_shared * model.d_shared + d * model.n_experts
    dense_ffn = 3 * d * model.d_ff
    embed = V * d * (1 if model.tie_embeddings else 2) + d
    routed = moe_layers * model.n_experts * expert
    other = L * attn + moe_layers * shared + dense_layers * dense_ffn + embed
    params = 4 * (other / mesh.fsdp + routed / (mesh.fsdp * mesh.expert))
    # activations per device: tokens of this device's batch rows
    tokens = batch_size * seq_len / mesh.size
    cb = 2 if dtype == "bfloat16" else 4
    per_layer = (4 * 4 * d                                  # residual in/out + two norm inputs (f32)
                 + cb * (hq + 2 * hkv) * hd + cb * hq * hd  # q, k, v and the attention output
                 + 4 * hq * min(seq_len, seq_len) / 2 * 2)  # causal scores + softmax (f32), half the square
    ffn_moe = cb * 3 * model.n_shared * model.d_shared + 4 * model.n_experts * 2   # shared SwiGLU; router
    ffn_dense = cb * 3 * model.d_ff
    if capacity_factor is None or not model.n_experts:
        routed_rows = tokens * model.top_k
    else:
        from moe_scaling.model.routing import capacity
        t_local = batch_size * seq_len // mesh.size
        routed_rows = model.n_experts * capacity(t_local, model.top_k, model.n_experts, capacity_factor)
    act = (tokens * (L * per_layer + moe_layers * ffn_moe + dense_layers * ffn_dense)
           + moe_layers * routed_rows * cb * (d + 3 * model.d_expert))
    logits = tokens * V * 4 * 2
    # FSDP: XLA (no rematerialisation) keeps every weight it all-gathers in the forward pass alive
    # until the backward pass has used it, so the whole model (over the expert axis) is resident at
    # the peak, not one layer at a time; "total_regathered" is the ideal that regathers per layer.
    full = 4 * (other + routed / mesh.expert)
    gathered = full - params if mesh.fsdp > 1 else 0
    out = {"params": int(params), "optimizer": int(2 * params), "gradients": int(params),
           "activations": int(act), "logits": int(logits), "gathered_weights": int(gathered)}
    out["total"] = sum(out.values())
    out["total_regathered"] = out["total"] - int(gathered) + int(full / max(L, 1))
    return out


def compile_step(model: ModelConfig, train: Any, seq_len: int):
    """Lower and compile the train step of ``model`` for ``train.mesh`` on abstract arrays (nothing
    is allocated): ``(compiled, abstract state, placement, dispatch)``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_scaling.model.routing import resolve_dispatch
    from moe_scaling.train.mesh import Placement, check_mesh
    from moe_scaling.train.step import init_state, make_train_step

    shape = MeshShape.parse(train.mesh)
    check_mesh(shape, n_experts=model.n_experts, batch_size=train.batch_size, n_devices=jax.device_count())
    steps = max(train.tokens // (train.batch_size * seq_len), 1)
    graphdef, abstract = nnx.eval_shape(lambda: init_state(model, train, steps))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    placement = Placement.create(shape, abstract)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, placement.state)
    batch = jax.ShapeDtypeStruct((train.batch_size, seq_len), jnp.int32, sharding=placement.batch)
    dispatch = resolve_dispatch(train.dispatch)
    step = make_train_step(graphdef, train, dispatch, placement if shape.size > 1 else None)
    return step.lower(state_in, batch, batch).compile(), abstract, placement, dispatch


def step_flops(model: ModelConfig, train: Any, seq_len: int) -> float:
    """FLOPs per device of one train step on ``train.mesh``: XLA's cost analysis of the compiled
    (partitioned, per-device) program."""
    cost = compile_step(model, train, seq_len)[0].cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def memory_plan(stage: Any, *, device_memory: int | None = None) -> dict[str, Any]:
    """Compile ``stage``'s train step (its model, train and data configs, its mesh) on abstract
    arrays and report per-device bytes, XLA's and the analytic estimate's."""
    import jax

    model, train, data = stage.model, stage.train, stage.data
    shape = MeshShape.parse(train.mesh)
    compiled, abstract, placement, dispatch = compile_step(model, train, data.seq_len)
    ma = compiled.memory_analysis()
    params = _shard_bytes(abstract[0] if hasattr(abstract, "__getitem__") else abstract,
                          placement.state[0])
    opt = _shard_bytes(abstract[1], placement.state[1])
    args, outs = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    xla_total = args + outs - alias + temp
    est = analytic_estimate(model, shape, train.batch_size, data.seq_len, train.dtype,
                            capacity_factor=train.capacity_factor if dispatch == "capacity" else None)
    report = {
        "model": {"params_total": int(sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract[0]))),
                  "d_model": model.d_model, "n_layers": model.n_layers, "n_experts": model.n_experts,
                  "vocab_size": model.vocab_size},
        "mesh": str(shape), "devices": shape.size, "backend": jax.default_backend(), "dispatch": dispatch,
        "dtype": train.dtype, "batch_size": train.batch_size, "seq_len": data.seq_len,
        "xla": {"params": params, "optimizer": opt, "arguments": args, "outputs": outs, "aliased": alias,
                "temporaries": temp, "total": xla_total},
        "analytic": est,
        "xla_over_analytic": xla_total / est["total"] if est["total"] else None,
    }
    if device_memory is not None:
        report["device_memory"] = int(device_memory)
        report["fits"] = bool(xla_total <= device_memory)
    return report


def format_plan(r: dict[str, Any]) -> str:
    """The plan as a few readable lines."""
    from moe_scaling.units import format_bytes

    x, a = r["xla"], r["analytic"]
    lines = [f"{r['model']['params_total']:,} parameters on mesh {r['mesh']} ({r['devices']} {r['backend']} "
             f"devices), batch {r['batch_size']} x {r['seq_len']}, {r['dtype']}, dispatch {r['dispatch']}",
             "per device            XLA          analytic",
             f"  parameters     {format_bytes(x['params']):>10}   {format_bytes(a['params']):>10}",
             f"  optimizer      {format_bytes(x['optimizer']):>10}   {format_bytes(a['optimizer']):>10}",
             f"  temporaries    {format_bytes(x['temporaries']):>10}   "
             f"{format_bytes(a['gradients'] + a['activations'] + a['logits'] + a['gathered_weights']):>10}  "
             f"(gradients + activations + logits + gathered FSDP weights)",
             f"  total          {format_bytes(x['total']):>10}   {format_bytes(a['total']):>10}  "
             f"(XLA / analytic = {r['xla_over_analytic']:.2f}; "
             f"{format_bytes(a['total_regathered'])} if FSDP regathered per layer)"]
    if "device_memory" in r:
        lines.append(f"  fits in {format_bytes(r['device_memory'])}: {'yes' if r['fits'] else 'NO'}")
    return "\n".join(lines)
