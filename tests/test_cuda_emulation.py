"""The CPU emulation of CUDA (tests/cuda_emulation.py) itself: what it must catch for the kernel tests to mean something.

Small kernels in the shim: shared memory read before it is written shows 0xFF bytes, a launch CUDA refuses reports
an error and runs nothing, shuffles follow CUDA's lane rules (width segments), 2-D blocks index as CUDA's, blocks
run by index or in a seeded random order, a floating-point atomicAdd does not compile, and a barrier that not every
thread reaches aborts the process with a message rather than hanging the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_emulation  # noqa: E402  (beside this file)

_SHIM = r"""
__global__ void read_shared(unsigned* out, int written) {
  __shared__ unsigned scratch[64];
  if (static_cast<int>(threadIdx.x) < written) scratch[threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = scratch[threadIdx.x];
}
__global__ void read_dynamic(unsigned* out) {
  extern __shared__ unsigned dyn[];
  out[threadIdx.x] = dyn[threadIdx.x];
}
__global__ void shuffles(float* out, int width) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 3, width);
  out[64 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 5, width);
}
__global__ void index_2d(int* out) {
  out[(blockIdx.y * gridDim.x + blockIdx.x) * blockDim.x * blockDim.y + threadIdx.y * blockDim.x + threadIdx.x] =
      static_cast<int>(threadIdx.x + 100 * threadIdx.y + 10000 * blockIdx.x + 1000000 * blockIdx.y);
}
__global__ void block_order(unsigned* ticket, unsigned* order) {
  if (threadIdx.x == 0) order[atomicAdd(ticket, 1u)] = blockIdx.y * gridDim.x + blockIdx.x;
}
__global__ void divergent_barrier() {
  if (threadIdx.x < 16) __syncthreads();
}
extern "C" {
int emu_read_shared(unsigned* out, int written, int blocks) {
  read_shared<<<blocks, 64>>>(out, written);
  return cudaGetLastError();
}
int emu_read_dynamic(unsigned* out) {
  read_dynamic<<<1, 32, 32 * sizeof(unsigned)>>>(out);
  return cudaGetLastError();
}
int emu_shuffles(float* out, int width) {
  shuffles<<<1, 64>>>(out, width);
  return cudaGetLastError();
}
int emu_index_2d(int* out) {
  index_2d<<<dim3(3, 2), dim3(4, 2)>>>(out);
  return cudaGetLastError();
}
int emu_launch_config(int blocks, int threads, int smem) {
  read_dynamic<<<blocks, threads, smem>>>(nullptr);
  return cudaGetLastError();
}
int emu_block_order(unsigned* ticket, unsigned* order) {
  block_order<<<dim3(40, 3), 32>>>(ticket, order);
  return cudaGetLastError();
}
void emu_divergent_barrier() { divergent_barrier<<<1, 32>>>(); }
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulation_self_test")
    lib = cuda_emulation.build(out, {}, [], _SHIM)
    lib.path = str(out / "libemu.so")
    return lib


ptr = cuda_emulation.ptr


def test_shared_memory_read_before_written_shows_poison(emu):
    """Half the threads write: the other half read 0xFFFFFFFF, in every block (no zeros, no leftovers)."""
    out32 = torch.zeros(3 * 64, dtype=torch.int32)
    assert emu.emu_read_shared(ptr(out32), 32, 3) == 0
    out = out32.view(3, 64).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(out[:, :32], torch.arange(32).expand(3, 32))
    assert (out[:, 32:] == 0xFFFFFFFF).all()
    dyn = torch.zeros(32, dtype=torch.int32)
    assert emu.emu_read_dynamic(ptr(dyn)) == 0
    assert (dyn == -1).all()  # 0xFFFFFFFF


@pytest.mark.parametrize(
    "blocks,threads,smem", [(0, 32, 0), (1, 2048, 0), (1, 32, 64 * 1024)], ids=["empty-grid", "2048-threads", "64KiB"]
)
def test_launch_configuration_cuda_refuses_is_reported_and_not_run(emu, blocks, threads, smem):
    assert emu.emu_launch_config(blocks, threads, smem) == 9  # cudaErrorInvalidConfiguration; nullptr not written


@pytest.mark.parametrize("width", [32, 8])
def test_shuffles_follow_cuda_lane_rules(emu, width):
    out = torch.full((128,), -1.0)
    assert emu.emu_shuffles(ptr(out), width) == 0
    lane = torch.arange(64) % 32
    warp_base = torch.arange(64) - lane
    seg_end = (lane // width) * width + width
    down = torch.where(lane + 3 < seg_end, lane + 3, lane) + warp_base
    xor = torch.where((lane ^ 5) < seg_end, lane ^ 5, lane) + warp_base
    assert torch.equal(out[:64], down.float()) and torch.equal(out[64:], xor.float())


def test_two_dimensional_grid_and_block_indices(emu):
    out = torch.full((3 * 2 * 8,), -1, dtype=torch.int32)
    assert emu.emu_index_2d(ptr(out)) == 0
    expect = [tx + 100 * ty + 10000 * bx + 1000000 * by for by in range(2) for bx in range(3) for ty in range(2)
              for tx in range(4)]  # fmt: skip
    assert out.tolist() == expect


def _block_order(emu, seed):
    emu.emu_set_block_order(seed)
    try:
        ticket = torch.zeros(1, dtype=torch.int32)
        order = torch.full((120,), -1, dtype=torch.int32)
        assert emu.emu_block_order(ptr(ticket), ptr(order)) == 0
    finally:
        emu.emu_set_block_order(0)
    assert ticket.item() == 120
    return order.tolist()


def test_blocks_run_by_index_or_in_a_seeded_random_order(emu):
    """Seed 0: by index (x fastest); a seed: a permutation of every block, a different one per seed, the same one
    again when the seed is set again (a failing order can be replayed)."""
    assert _block_order(emu, 0) == list(range(120))
    shuffled = [_block_order(emu, seed) for seed in (1, 2)]
    for order in shuffled:
        assert sorted(order) == list(range(120)) and order != list(range(120))
    assert shuffled[0] != shuffled[1]
    assert _block_order(emu, 1) == shuffled[0]


def test_divergent_barrier_aborts_with_a_message_instead_of_hanging(emu):
    code = textwrap.dedent(f"""
        import ctypes
        ctypes.CDLL({emu.path!r}).emu_divergent_barrier()
    """)
    env = dict(os.environ, FASTMTL_EMU_WATCHDOG_S="2")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "did not finish" in proc.stderr


def test_float_atomic_add_does_not_compile(tmp_path):
    """fastmtl's kernels are deterministic: a floating-point atomicAdd (a sum in the order blocks finish) is refused
    at compile time, not emulated."""
    shim = (
        '__global__ void add(float* p) { atomicAdd(p, 1.0f); }\n'
        'extern "C" void emu_add(float* p) { add<<<1, 32>>>(p); }\n'
    )
    with pytest.raises(AssertionError, match="deleted"):
        cuda_emulation.build(tmp_path, {}, [], shim)
