"""Liger-Kernel's GeGLU, RMSNorm and LayerNorm against the denoiser's torch ops, eager and compiled.

    python -m bench.bench_liger           # GPU: PRX small at 1024 px, batch 16, bf16
    python -m bench.bench_liger --smoke   # CPU: tiny shapes, torch and compile only

Each op runs forward + backward (mode "full") at the shapes of one PRX small step: GeGLU on the
MLP's (16 x 1024, 6272) gate and up; RMSNorm on q/k heads (16 x 1024 x 28, 64) in fp32 math;
LayerNorm without affine on (16 x 1024, 1792). GB/s counts the minimal bytes of forward and
backward. `model.fused_ops` should default to whichever of liger and compile (the PRX presets
compile their blocks) is faster here. Rows go to bench/results/liger.csv.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import append_rows, environment, time_ms


def torch_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def torch_rms_norm(x, weight):
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=1e-6) * weight.float()).to(x.dtype)


def torch_layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def cases(smoke: bool, device, dtype):
    rows, mlp, hidden, heads = (64, 96, 32, 4) if smoke else (16 * 1024, 6272, 1792, 28)
    g = torch.Generator(device).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    gate, up = leaf(rows, mlp), leaf(rows, mlp)
    q = leaf(rows * heads, 64)
    scale = torch.ones(64, device=device, requires_grad=True)
    x = leaf(rows, hidden)
    size = torch.tensor([], dtype=dtype).element_size()
    # bytes: GeGLU fwd reads 2n, writes n; bwd reads 3n (grad, gate, up), writes 2n.
    yield "geglu", f"{rows}x{mlp}", 8 * rows * mlp * size, torch_geglu, "geglu", (gate, up)
    # norms: fwd reads and writes n; bwd reads grad and x, writes the input grad.
    yield "rms_norm", f"{rows * heads}x64", 5 * rows * heads * 64 * size, torch_rms_norm, "rms_norm", (q, scale)
    yield "layer_norm", f"{rows}x{hidden}", 5 * rows * hidden * size, torch_layer_norm, "layer_norm", (x,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, torch and compile only")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    providers = ["torch", "compile"]
    if device.type == "cuda":
        from prx.config import ConfigError
        from prx.model import liger

        try:
            liger.check_available(device)
            providers.append("liger")
        except ConfigError as err:  # a bare GPU machine: carry the wheel (bench/gpu_check.sh)
            print(f"bench_liger: no liger provider: {err}")
    rows = []
    for op, shape, nbytes, reference, liger_name, leaves in cases(args.smoke, device, dtype):
        fns = {"torch": reference, "compile": torch.compile(reference)}
        if "liger" in providers:
            fns["liger"] = {"geglu": liger.geglu, "rms_norm": lambda x, w: liger.rms_norm(x, w, 1e-6),
                            "layer_norm": lambda x: liger.layer_norm(x, 1e-6)}[liger_name]
        grad = torch.randn_like(leaves[0])
        times = {}
        for name in providers:
            def full(fn=fns[name]):
                out = fn(*leaves)
                out.backward(grad)
            times[name] = time_ms(full, device)
            rows.append({**env, "op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."), "mode": "full",
                         "provider": name, "ms": round(times[name], 4),
                         "gbps": round(nbytes / (times[name] * 1e-3) / 1e9, 1)})
        if "liger" in times:
            rows[-1]["ratio"] = round(times["compile"] / times["liger"], 2)
            rows[-1]["note"] = "ratio = compile ms / liger ms"
        print("  ".join(f"{op:<11}{name} {times[name]:.3f} ms" for name in providers))
    print(f"rows appended to {append_rows('liger', rows, args.out_dir)}")


if __name__ == "__main__":
    main()
