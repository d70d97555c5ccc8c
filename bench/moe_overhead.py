"""MoE train-step overhead against equal-active dense twins, and MFU, in one process.

    python bench/moe_overhead.py --json            # all rows, prints {"results": [...]}
    python bench/moe_overhead.py --only d256_e64_k8_fine --steps 5
    python bench/moe_overhead.py --torch           # also time a plain PyTorch CPU dense twin
    python bench/moe_overhead.py --peer --json     # also time transformers' qwen3_moe (the peer)

Every row times the full training step (forward, backward, AdamW with clipping: the trainer's
own jitted step from :mod:`moe_scaling.train.step`) at batch 16 x 256 tokens, float32, for an MoE
model and for its dense twin (:meth:`ModelConfig.dense_twin`: FFN width
``top_k * d_expert + shared``), the two alternating step by step so that load from other
processes hits both alike. Reported per row:

* ``overhead_ratio``: best MoE step time / best dense-twin step time (wall clock);
  ``overhead_ratio_cpu``: the same with process CPU time (user + system, all threads), steadier
  when other processes share the cores.
* ``mfu``: model FLOPs/s (:func:`moe_scaling.costs.flops_per_token`, training, causal) over the
  f32 matmul peak measured here (best jitted 2048 x 2048 matmul, at the start and the end).
* ``tokens_per_s``, ``step_ms``, ``dropped_fraction`` (capacity dispatch, untrained router:
  the first step's).
* with ``--torch``: the dense twin's ``torch_tokens_per_s`` (PyTorch eager, same model, run in a
  child process so that XLA's threads do not compete with PyTorch's) and
  ``jax_speedup_over_torch``.
* with ``--peer`` (MoE rows): the same model in Hugging Face transformers, ``Qwen3MoeForCausalLM``
  built from our exported ``config.json`` (:func:`moe_scaling.hf.config.hf_config`: same layers,
  widths, QK-norm, RoPE, tied embeddings, softmax top-k router with renormalised weights), float32,
  SDPA attention, its router load-balancing loss on, AdamW with clipping: one full training step,
  at the same batch. It runs in a child process that waits on a pipe between steps, and its steps
  are interleaved with ours (dense twin, ours, peer, repeated ``--steps`` times), so that the load
  of other processes hits all alike. ``peer_tokens_per_s`` is from the peer's median step,
  ``median_tokens_per_s`` is ours likewise, and ``speedup_over_peer`` is the median over the
  interleaved repeats ``i`` of ``peer_step_i / our_step_i``. ``--peer-experts`` picks the
  transformers experts implementation(s) (``grouped_mm``, the default of transformers 5.24: on
  the coarse row, under load, tied with ``eager`` by median step and 1.6x faster by best step;
  ``eager``, a Python loop over the experts hit;
  ``batched_mm``, which gathers a weight matrix per (token, expert) pair: 8.6 GB at these shapes);
  with several, each row's fastest by median is the peer (``peer_tokens_per_s_by_experts`` keeps
  them all). Note that our dispatch is the trainer's (``capacity``: it may drop tokens,
  ``dropped_fraction``), the peer's is dropless.

Rows: ``d256_e8_k2`` (8 experts of width 512, top 2), ``d256_e64_k8_fine`` (64 experts of
width 128, top 8: the fine-grained case), ``d128_e32_k4``, each with its ``dense_*`` twin, and
``d256_e64_k8_fine_cf1`` (the fine-grained model at capacity factor 1.0). Results are written
to ``bench/moe_overhead.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moe_scaling.config import ModelConfig, TrainConfig  # noqa: E402
from moe_scaling.costs import flops_per_token  # noqa: E402
from moe_scaling.hf.config import hf_config  # noqa: E402
from moe_scaling.model.routing import resolve_dispatch  # noqa: E402
from moe_scaling.runtime import machine_info  # noqa: E402
from moe_scaling.train.step import init_state, make_train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
BASE = dict(vocab_size=256, n_layers=2, max_seq_len=256)
# name -> MoE config; every MoE row is paired with its dense twin ("dense_" + name).
CONFIGS = {
    "d256_e8_k2": ModelConfig(**BASE, d_model=256, n_heads=4, d_ff=1024, n_experts=8, top_k=2,
                              d_expert=512),
    "d256_e64_k8_fine": ModelConfig(**BASE, d_model=256, n_heads=4, d_ff=1024, n_experts=64,
                                    top_k=8, d_expert=128),
    "d128_e32_k4": ModelConfig(**BASE, d_model=128, n_heads=2, d_ff=512, n_experts=32, top_k=4,
                               d_expert=128),
}
CONFIGS["d256_e64_k8_fine_cf1"] = CONFIGS["d256_e64_k8_fine"]
CAPACITY = {"d256_e64_k8_fine_cf1": 1.0}  # rows with their own capacity factor


def matmul_peak(n: int = 2048, dtype=jnp.float32, reps: int = 5) -> float:
    """Best FLOP/s of a jitted ``n x n @ n x n`` matmul."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class StepTimer:
    """The trainer's jitted train step for one config, compiled, with one warm-up step done."""

    def __init__(self, cfg: ModelConfig, *, batch: int, seq: int, dispatch: str,
                 dtype: str = "float32", capacity_factor: float = 1.25):
        tcfg = TrainConfig(tokens=batch * seq * 1000, batch_size=batch, dispatch=dispatch,
                           dtype=dtype, capacity_factor=capacity_factor)
        graphdef, self.state = init_state(cfg, tcfg, 1000)
        step = make_train_step(graphdef, tcfg, resolve_dispatch(dispatch))
        rng = np.random.default_rng(0)
        self.x = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
        self.y = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
        t0 = time.perf_counter()
        self.compiled = step.lower(self.state, self.x, self.y).compile()
        self.compile_s = time.perf_counter() - t0
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.run(record=False)
        self.first_dropped = float(self.metrics["dropped_fraction"])  # untrained router

    def run(self, record: bool = True) -> None:
        t0, c0 = time.perf_counter(), cpu_seconds()
        self.state, self.metrics = self.compiled(self.state, self.x, self.y)
        jax.block_until_ready(self.metrics)
        if record:
            self.times.append(time.perf_counter() - t0)
            self.cpu_times.append(cpu_seconds() - c0)

    def result(self) -> dict:
        """Best wall and CPU step times (the least disturbed by other processes)."""
        return {"step_s": min(self.times), "median_step_s": statistics.median(self.times),
                "cpu_s": min(self.cpu_times), "compile_s": self.compile_s,
                "dropped_fraction": self.first_dropped}


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def torch_step_timer(cfg: ModelConfig, *, batch: int, seq: int, lr: float = 3e-3):
    """A plain PyTorch (eager, CPU, float32) twin of the dense model: same layers, widths,
    tied embeddings, QK-norm, RoPE, GQA, fused q/k/v and gate/up, AdamW + clipping.
    Returns a function that runs one training step and returns its seconds."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    d, h, kv, hd, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_layers

    def param(*shape, std=0.02):
        return torch.nn.Parameter(torch.randn(*shape) * std)

    params = {"embed": param(cfg.vocab_size, d), "final": torch.nn.Parameter(torch.ones(d))}
    for i in range(L):
        params.update({f"{i}.an": torch.nn.Parameter(torch.ones(d)), f"{i}.fn": torch.nn.Parameter(torch.ones(d)),
                       f"{i}.qn": torch.nn.Parameter(torch.ones(hd)), f"{i}.kn": torch.nn.Parameter(torch.ones(hd)),
                       f"{i}.qkv": param(d, (h + 2 * kv) * hd), f"{i}.o": param(h * hd, d),
                       f"{i}.gu": param(d, 2 * cfg.d_ff), f"{i}.down": param(cfg.d_ff, d)})
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rope(x):  # [B, heads, S, hd]
        half = hd // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def loss_fn(tokens, targets):
        x = params["embed"][tokens.reshape(-1)]
        for i in range(L):
            qkv = rms(x, params[f"{i}.an"]) @ params[f"{i}.qkv"]
            q, k, v = qkv.split([h * hd, kv * hd, kv * hd], -1)
            q = rope(rms(q.view(batch, seq, h, hd), params[f"{i}.qn"]).transpose(1, 2))
            k = rope(rms(k.view(batch, seq, kv, hd), params[f"{i}.kn"]).transpose(1, 2))
            v = v.view(batch, seq, kv, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
            x = x + o.transpose(1, 2).reshape(batch * seq, h * hd) @ params[f"{i}.o"]
            gate, up = (rms(x, params[f"{i}.fn"]) @ params[f"{i}.gu"]).chunk(2, -1)
            x = x + (F.silu(gate) * up) @ params[f"{i}.down"]
        logits = rms(x, params["final"]) @ params["embed"].T
        return F.cross_entropy(logits, targets.reshape(-1))

    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, seq)))
    targets = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, seq)))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    step()
    return step


def row(name: str, cfg: ModelConfig, timing: dict, *, batch: int, seq: int, peak: float,
        dense: dict | None = None, capacity_factor: float | None = None) -> dict:
    flops = flops_per_token(cfg, context=seq, training=True) * batch * seq
    out = {"name": name,
           "overhead_ratio": timing["step_s"] / dense["step_s"] if dense else 1.0,
           "overhead_ratio_cpu": timing["cpu_s"] / dense["cpu_s"] if dense else 1.0,
           "mfu": flops / timing["step_s"] / peak, "tokens_per_s": batch * seq / timing["step_s"],
           "step_ms": 1e3 * timing["step_s"], "step_cpu_ms": 1e3 * timing["cpu_s"],
           "compile_s": timing["compile_s"], "model_gflop_per_step": flops / 1e9}
    if cfg.is_moe:
        out.update(capacity_factor=capacity_factor, dropped_fraction=timing["dropped_fraction"])
    return out


def torch_times_subprocess(name: str, args) -> list[float]:
    """Step times of the PyTorch twin of ``name``'s dense model, in a fresh process (so that
    XLA's thread pool does not compete with PyTorch's)."""
    cmd = [sys.executable, __file__, "--torch-only", name, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    return json.loads(out.stdout.strip().splitlines()[-1])["times"]


# --------------------------------------------------------------------------------------
# The peer: transformers' own qwen3_moe model, in a child process
# --------------------------------------------------------------------------------------

PEER_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")  # transformers 5.24's CPU experts


def peer_child(hf_cfg: dict, *, batch: int, seq: int, experts: str, lr: float = 3e-3) -> int:
    """Serve training steps of transformers' ``Qwen3MoeForCausalLM`` built from ``hf_cfg`` (float32,
    SDPA attention, ``experts_implementation=experts``, the router's load-balancing loss on, AdamW
    with clipping at 1.0) over stdin/stdout: after one warm-up step it prints ``{"ready": ...}``;
    then for every line ``n`` it reads, it runs ``n`` steps and prints their seconds as JSON."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{k: v for k, v in hf_cfg.items() if k != "architectures"})
    config.output_router_logits = True  # the aux loss, as our step has
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                             experts_implementation=experts, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, hf_cfg["vocab_size"], (batch, seq)))
    y = torch.from_numpy(rng.integers(0, hf_cfg["vocab_size"], (batch, seq)))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=y).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    step()
    print(json.dumps({"ready": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "experts_implementation": experts,
                                "n_params": sum(p.numel() for p in model.parameters())}}), flush=True)
    for line in sys.stdin:
        print(json.dumps([step() for _ in range(int(line))]), flush=True)
    return 0


class Peer:
    """The peer's training step for one of our configs, in a child process that waits (blocked
    on a pipe, using no CPU) between calls, so that its steps can be interleaved with ours."""

    def __init__(self, cfg: ModelConfig, *, batch: int, seq: int, experts: str):
        spec = json.dumps({"hf": hf_config(cfg, dtype="float32"), "batch": batch, "seq": seq,
                           "experts": experts})
        self.proc = subprocess.Popen([sys.executable, __file__, "--peer-child", spec], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer child ({experts}) exited with {self.proc.wait()}")
        self.info = json.loads(line)["ready"]
        self.times: list[float] = []

    def run(self, n: int = 1) -> None:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        self.times += json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def peer_result(ours: list[float], peers: list[Peer], tokens: int) -> dict:
    """The peer columns of a row: the fastest experts implementation by median step time;
    ``speedup_over_peer`` = median over the interleaved steps ``i`` of ``peer_i / ours_i``."""
    if not peers:
        return {}
    best = min(peers, key=lambda p: statistics.median(p.times))
    return {"peer_tokens_per_s": tokens / statistics.median(best.times),
            "median_tokens_per_s": tokens / statistics.median(ours),
            "speedup_over_peer": statistics.median(p / o for p, o in zip(best.times, ours)),
            "peer_experts": best.info["experts_implementation"],
            "peer_tokens_per_s_by_experts": {p.info["experts_implementation"]: tokens / statistics.median(p.times)
                                             for p in peers}}


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _torch_version() -> str:
    import torch
    return torch.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--only", nargs="*", default=None, help=f"rows to run (of {', '.join(CONFIGS)})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (best)")
    p.add_argument("--dispatch", default="auto", help="auto, capacity, dropless, ragged, reference")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--capacity-factor", type=float, default=TrainConfig().capacity_factor)
    p.add_argument("--torch", action="store_true", help="also time a PyTorch CPU dense twin")
    p.add_argument("--peer", action="store_true",
                   help="also time transformers' qwen3_moe at the same shapes, interleaved with ours")
    p.add_argument("--peer-experts", default="grouped_mm",
                   help=f"experts implementation(s) of the peer, comma-separated (of {', '.join(PEER_IMPLEMENTATIONS)}); "
                        "with several, each row's fastest (median step) is the peer")
    p.add_argument("--out", default=str(HERE / "moe_overhead.json"), help="results file ('' = none)")
    p.add_argument("--torch-only", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--peer-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer_child:  # the child process of Peer
        spec = json.loads(args.peer_child)
        return peer_child(spec["hf"], batch=spec["batch"], seq=spec["seq"], experts=spec["experts"])
    if args.torch_only:  # the child process of torch_times_subprocess
        step = torch_step_timer(CONFIGS[args.torch_only].dense_twin(), batch=args.batch, seq=args.seq)
        print(json.dumps({"times": [step() for _ in range(args.steps)]}))
        return 0

    t_start = time.perf_counter()
    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak = matmul_peak(dtype=dt)
    kw = dict(batch=args.batch, seq=args.seq, dtype=args.dtype, dispatch=args.dispatch)
    rk = dict(batch=args.batch, seq=args.seq)
    dense_timers: dict[ModelConfig, StepTimer] = {}  # twins shared by several MoE rows
    torch_times: dict[ModelConfig, list[float]] = {}
    rows = []
    tokens = args.batch * args.seq
    peer_experts = args.peer_experts.split(",") if args.peer else []
    for name in args.only or list(CONFIGS):
        cfg, cf = CONFIGS[name], CAPACITY.get(name, args.capacity_factor)
        twin = cfg.dense_twin()
        if twin not in dense_timers:
            dense_timers[twin] = StepTimer(twin, **kw)
        dense, moe = dense_timers[twin], StepTimer(cfg, capacity_factor=cf, **kw)
        peers = [Peer(cfg, batch=args.batch, seq=args.seq, experts=e) for e in peer_experts]
        for _ in range(args.steps):  # alternate, so that load changes hit every model alike
            dense.run()
            moe.run()
            for peer in peers:
                peer.run()
        for peer in peers:
            peer.close()
        rows.append((name, cfg, cf, moe.result(), twin, peer_result(moe.times, peers, tokens)))
        del moe
        if args.torch and twin not in torch_times:
            torch_times[twin] = torch_times_subprocess(name, args)
    peak = max(peak, matmul_peak(dtype=dt))  # best of the start and the end of the run
    results, done = [], set()
    for name, cfg, cf, timing, twin, peer in rows:
        d = dense_timers[twin].result()
        if twin not in done:
            done.add(twin)
            r = row("dense_" + name, twin, d, peak=peak, **rk)
            if torch_times.get(twin):
                t = min(torch_times[twin])
                r.update(torch_tokens_per_s=args.batch * args.seq / t, torch_step_ms=1e3 * t,
                         jax_speedup_over_torch=t / d["step_s"])
            results.append(r)
        results.append(row(name, cfg, timing, peak=peak, dense=d, capacity_factor=cf, **rk) | peer)
    if not args.json:
        for r in results:
            extra = f"  torch x{r['jax_speedup_over_torch']:.2f}" if "jax_speedup_over_torch" in r else ""
            if "speedup_over_peer" in r:
                extra += (f"  peer {r['peer_tokens_per_s']:,.0f} tok/s ({r['peer_experts']}):"
                          f" x{r['speedup_over_peer']:.2f}")
            print(f"{r['name']:>26}  overhead {r['overhead_ratio']:.2f}x (cpu {r['overhead_ratio_cpu']:.2f}x)"
                  f"  mfu {r['mfu']:.1%}  {r['tokens_per_s']:,.0f} tok/s  ({r['step_ms']:.0f} ms/step){extra}")
    doc = {"results": results,
           "setup": {"backend": jax.default_backend(), "dispatch": resolve_dispatch(args.dispatch),
                     "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
                     "n_layers": BASE["n_layers"], "capacity_factor": args.capacity_factor,
                     "matmul_peak_gflops": peak / 1e9, "torch": _torch_version() if args.torch or args.peer else None,
                     "transformers": _transformers_version() if args.peer else None, "jax": jax.__version__,
                     "machine": machine_info(), "bench_s": time.perf_counter() - t_start}}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
