"""The trainer on a GPU, end to end: what the CPU tests cannot reach. The Triton kernels inside the
loop (patchify + noise, TREAD routing, fused losses, Newton-Schulz for Muon), bf16 autocast,
per-block inductor compile, and FSDP2 over NCCL.

A machine here has one GPU, so NCCL runs one rank, and one rank never takes Muon's sharded path
(the rows all-to-all'd to each matrix's owner). Two NCCL ranks on one GPU are refused ("Duplicate
GPU detected", ncclInvalidUsage, since NCCL 2.5), and NCCL's maintainers say that removing the
check would not make it work (its topology search assumes a GPU per rank; MPS does not change
that: github.com/NVIDIA/nccl/issues/418). No supported way runs that path over NCCL on one GPU.
Gloo does take two ranks on one GPU: it stages CUDA tensors through pinned host memory, and
PyTorch's backend table (docs/source/distributed.md) lists all_to_all, all_gather, reduce_scatter
and scatter on the GPU for gloo. So the sharded path, with CUDA tensors and the Triton
Newton-Schulz, runs here over gloo; NCCL's own all-to-all needs a machine with two GPUs."""

import pytest

from tests.test_parallel import run_fsdp_worker
from tests.test_recipe import recipe_args, records, teachers  # noqa: F401 (teachers: a fixture)
from tests.test_train import straight_and_resumed
from tests.tiny_text import WIDTH, save_tiny_text_encoder

pytestmark = pytest.mark.gpu


def test_fsdp2_over_nccl_with_bf16_compute_is_as_accurate_as_autocast_and_steps_alike():
    done = run_fsdp_worker()  # CUDA, NCCL; the checks are those of its CPU run in test_parallel.py
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "FSDP2 on cuda: every check passed" in done.stdout


def test_fsdp2_compiled_and_checkpointed_over_nccl_is_as_accurate_as_autocast():
    """parallelize as the PRX presets run it (FSDP2, per-block inductor compile) with selective
    checkpointing, bf16 compute, one NCCL rank: output and every gradient within twice eager
    autocast's error of the fp32 eager model (its CPU run in test_parallel.py: 2 ranks, fp32)."""
    done = run_fsdp_worker(script="tests/fsdp_compile_worker.py")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "inductor) + selective checkpointing on cuda, torch.bfloat16: every check passed" in done.stdout


@pytest.mark.parametrize("script", ["tests/fsdp_worker.py", "tests/fsdp_compile_worker.py"])
def test_two_ranks_on_one_gpu_over_gloo_shard_muon_and_the_compiled_model(script):
    """Two processes on the one GPU over gloo (the module docstring says why not NCCL): fsdp_worker's
    Muon + Adam step takes the sharded all-to-all path and must move every parameter exactly as
    unsharded; the compiled, checkpointed model with a micro-batch per rank must match the eager
    one with averaged gradients, as in the checks above."""
    done = run_fsdp_worker("--gloo", script=script, nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("every check passed") == 2, done.stdout


def test_recipe_compiled_with_muon_learns_and_resumes(tmp_path, teachers):  # noqa: F811
    """Every recipe piece, compiled blocks, Muon with Triton Newton-Schulz, bf16: the loss falls,
    and a run stopped at step 30 and resumed matches the uninterrupted one.

    Not bit for bit: GPU backward kernels (cuDNN attention's among them) are not deterministic, so
    two runs of the same steps drift apart by rounding. A wrong resume (data position, noise or
    timestep stream) changes each step's batch: from one step to the next, this run's diffusion
    loss changes by 37 % (median) and at least 4.3 % (measured on the CPU, steps 30 to 60), far
    more than the 2 % allowed here."""
    encoder = save_tiny_text_encoder(tmp_path / "text")  # MiniLM's package is not on a bare GPU machine
    args = recipe_args(teachers) + ["--set", f"text.encoder={encoder}", "--set", f"model.text_dim={WIDTH}",
                                    "--lr", "3e-3", "--set", "optim.warmup_steps=10",
                                    "--set", "train.device=cuda", "--set", "parallel.compile=true",
                                    "--set", "optim.name=muon", "--set", "train.checkpoint_every=30"]
    straight, stopped = straight_and_resumed(args, tmp_path, steps=60)

    a = records(straight)
    first, last = (sum(r["loss_diffusion"] for r in part) / 15 for part in (a[:15], a[-15:]))
    assert last < 0.7 * first, (first, last)
    b = {r["step"]: r["loss_diffusion"] for r in records(stopped)}  # the resumed steps' come last
    assert sorted(b) == list(range(1, 61))
    for r in a[30:]:
        assert b[r["step"]] == pytest.approx(r["loss_diffusion"], rel=2e-2), r["step"]
