"""Fused reparameterization and KL divergence of a diagonal Gaussian posterior, in Triton.

Forward, one launch: read ``mu`` and ``logvar`` once, draw ``eps`` in the kernel, write
``z = mu + exp(0.5 * logvar) * eps`` and reduce ``KL = -0.5 * (1 + logvar - mu^2 - exp(logvar))``
in the same pass. Backward, one launch: ``grad_mu`` and ``grad_logvar`` from ``grad_z`` and
``grad_kl`` together, regenerating ``eps`` from the seed instead of reading a saved copy, and
reading ``mu`` and ``logvar``, which the caller keeps anyway: exact at any logvar.

The per-element math mirrors ``csrc/fastvae_math.h``, shared with the C++ backend:
``kl_term``, ``kl_grad_mu``, ``kl_grad_logvar``, ``reparameterize``,
``reparameterize_grad_logvar`` and ``philox_normal`` (which reproduces
``tl.randn``: key = the 64-bit seed, counter = the row-major element index).

Arithmetic is float32 (float64 for float64 inputs) whatever the storage dtype: inputs are
converted after the load and results before the store.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction

from fastvae._checks import accumulate_dtype, latent_memory_format

# What the forward computes besides z: nothing, the elementwise KL, one reduced value, or one
# total per sample.
KL_NONE = tl.constexpr(0)
KL_ELEMENTWISE = tl.constexpr(1)
KL_REDUCED = tl.constexpr(2)
KL_PER_SAMPLE = tl.constexpr(3)

# 1024 elements per tile with 4 warps is 8 elements a thread: two 16-byte loads per fp32 input
# and enough independent Philox streams per thread to hide integer-multiply latency.
BLOCK = 1024
NUM_WARPS = 4
# Persistent programs per SM on CUDA. ptxas (sm_90) gives these kernels 48 to 72 registers a
# thread in float32 and up to 128 in float64, so four 4-warp programs are resident on an SM in
# every variant; a fifth would run as a second wave and double its programs' share of the time.
# Four tiles of two inputs in flight per SM (32 KiB in float32) keep HBM busy.
PROGRAMS_PER_SM = 4
# The interpreter runs programs one after another, so on CPU a handful suffices to exercise
# the cross-program reduction without paying per-program overhead.
CPU_PROGRAMS = 4
# The final sum runs over this many partials (the unused ones zero) whatever the GPU, as long as
# it has no more than REDUCTION_WIDTH / PROGRAMS_PER_SM = 256 SMs: tl.sum's association follows
# the width, so a width taken from the SM count would make the KL's bits depend on the GPU model.
REDUCTION_WIDTH = 1024
# Programs of a per-sample KL at most (see _splits): about one wave of PROGRAMS_PER_SM programs on
# GPUs of 108 to 148 SMs, and within REDUCTION_WIDTH, so the last program sums every sample's
# partials in one tile.
PER_SAMPLE_PROGRAMS = 512

# Offsets are int32 unless the last tile's offsets (up to numel + BLOCK - 1) could overflow.
_INT32_LIMIT = 2**31 - 1 - BLOCK


@triton.jit
def _num_tiles(n_elements, BLOCK: tl.constexpr, INT64: tl.constexpr):
    # Triton passes an element count below 2**31 as int32 even when the host asks for int64
    # offsets (counts in (2**31 - 1 - BLOCK, 2**31)), where cdiv's n_elements + BLOCK - 1 would
    # overflow: widen it first.
    if INT64:
        n_elements = tl.cast(n_elements, tl.int64)
    return tl.cdiv(n_elements, BLOCK)


@triton.jit
def _noise_index(offsets, channels, spatial, CHANNELS_LAST: tl.constexpr):
    """The Philox counter of the element at memory offset ``offsets``: its row-major index.

    Channels-last memory runs over (N, spatial, C) where the logical order is (N, C, spatial),
    so a channels-last input draws the same eps per element as its contiguous copy.
    """
    index = offsets
    if CHANNELS_LAST:
        within = offsets % (channels * spatial)
        position = within // channels
        index = offsets - within + (within - position * channels) * spatial + position
    return index


@triton.jit
def _owned_tiles(pid, num_programs, n_elements, sample_size, PER_SAMPLE: tl.constexpr, INT64: tl.constexpr,
                 BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """The tiles program ``pid`` of the forward reads: tiles ``first_tile, first_tile + tile_step,
    ...`` below ``num_tiles`` of the elements from ``first`` to ``end``."""
    if PER_SAMPLE:
        # SPLITS programs per sample (its elements are contiguous in memory in either layout),
        # program c of a sample owning its tiles c, c + SPLITS, ...: a batch of few large samples
        # fills the GPU. Each total is then the sum of the sample's SPLITS partials in index order
        # (_sum_across_programs): deterministic, like the reduced KL.
        sample = pid // SPLITS
        if INT64:
            first = tl.cast(sample, tl.int64) * sample_size
        else:
            first = sample * sample_size
        end = first + sample_size
        first_tile, tile_step = pid % SPLITS, SPLITS
        num_tiles = _num_tiles(sample_size, BLOCK, INT64)
    else:
        # Persistent grid: program p owns tiles p, p + P, p + 2P, ... so its partial sum, and
        # with it the reduced KL, depends only on the grid size, never on scheduling.
        first, end = 0, n_elements
        first_tile, tile_step = pid, num_programs
        num_tiles = _num_tiles(n_elements, BLOCK, INT64)
    return first, end, first_tile, tile_step, num_tiles


@triton.jit
def _sum_across_programs(partial, kl_ptr, partials_ptr, counter_ptr, divisor, pid, num_programs,
                         PER_SAMPLE: tl.constexpr, MAX_PROGRAMS: tl.constexpr, SPLITS: tl.constexpr):
    """The reduced KL (``partial`` summed over programs, / ``divisor``), or each sample's total
    (its SPLITS programs' partials), written in the same launch: a deterministic one-launch
    reduction. Every program publishes its partial, and the program that arrives last at the
    counter sums all partials in index order."""
    tl.store(partials_ptr + pid, partial)
    # The partial may be stored by a different thread than the one issuing the atomic; the
    # CTA barrier orders that store before the atomic's release, and release cumulativity
    # then makes it visible at GPU scope to whoever acquires the counter after us.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == num_programs - 1:
        # Every other program's release happened before our acquire. The ".cg" loads read
        # through L2 (the coherence point) rather than a possibly stale L1 line.
        if PER_SAMPLE:
            # Sample s's partials are s * SPLITS ... s * SPLITS + SPLITS - 1: one row each.
            samples = tl.arange(0, MAX_PROGRAMS // SPLITS)
            index = samples[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]
            partials = tl.load(partials_ptr + index, mask=index < num_programs, other=0.0, cache_modifier=".cg")
            tl.store(kl_ptr + samples, tl.sum(partials, axis=1), mask=samples * SPLITS < num_programs)
        else:
            index = tl.arange(0, MAX_PROGRAMS)
            partials = tl.load(partials_ptr + index, mask=index < num_programs, other=0.0, cache_modifier=".cg")
            tl.store(kl_ptr, tl.sum(partials, axis=0) / divisor)
        # Ready for the next eager launch on this stream; nobody else touches it in this one.
        tl.store(counter_ptr, 0)


@triton.jit(do_not_specialize=["divisor", "channels", "spatial"])
def _reparameterize_kl_forward_kernel(
    mu_ptr,
    logvar_ptr,
    z_ptr,
    kl_ptr,
    partials_ptr,
    counter_ptr,
    seed_ptr,
    n_elements,
    sample_size,
    divisor,
    channels,
    spatial,
    WRITE_Z: tl.constexpr,
    KL_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PROGRAMS: tl.constexpr,
    SPLITS: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], COMPUTE)
    if WRITE_Z:
        # A tensor on the device, not an argument: the host never reads a drawn seed back, and a
        # captured CUDA graph reads the key its replay's draw wrote.
        seed = tl.load(seed_ptr)
    first, end, first_tile, tile_step, num_tiles = _owned_tiles(
        pid, num_programs, n_elements, sample_size, KL_MODE == KL_PER_SAMPLE, INT64, BLOCK, SPLITS
    )
    for tile in range(first_tile, num_tiles, tile_step):
        if INT64:  # tl.cast, not .to(): under the interpreter the loop variable is a Python int
            offsets = first + tl.cast(tile, tl.int64) * BLOCK + lanes
        else:
            offsets = first + tile * BLOCK + lanes
        mask = offsets < end
        mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        if WRITE_Z:
            noise_index = _noise_index(offsets, channels, spatial, CHANNELS_LAST)
            eps = tl.randn(seed, noise_index).to(COMPUTE)  # philox_normal
            z = mu + tl.exp(0.5 * logvar) * eps  # reparameterize
            tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)
        if KL_MODE != KL_NONE:
            kl = -0.5 * (1.0 + logvar - mu * mu - tl.exp(logvar))  # kl_term
            if KL_MODE == KL_ELEMENTWISE:
                tl.store(kl_ptr + offsets, kl.to(kl_ptr.dtype.element_ty), mask=mask)
            else:
                acc += tl.where(mask, kl, 0.0)

    if KL_MODE == KL_PER_SAMPLE and SPLITS == 1:
        tl.store(kl_ptr + pid, tl.sum(acc, axis=0))
    elif KL_MODE == KL_REDUCED or KL_MODE == KL_PER_SAMPLE:
        _sum_across_programs(
            tl.sum(acc, axis=0), kl_ptr, partials_ptr, counter_ptr, divisor, pid, num_programs,
            KL_MODE == KL_PER_SAMPLE, MAX_PROGRAMS, SPLITS,
        )


@triton.jit(do_not_specialize=["divisor", "channels", "spatial"])
def _reparameterize_kl_backward_kernel(
    grad_z_ptr,
    grad_kl_ptr,
    mu_ptr,
    logvar_ptr,
    grad_mu_ptr,
    grad_logvar_ptr,
    seed_ptr,
    n_elements,
    sample_size,
    divisor,
    channels,
    spatial,
    HAS_GRAD_Z: tl.constexpr,
    GRAD_KL_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = _num_tiles(n_elements, BLOCK, INT64)
    lanes = tl.arange(0, BLOCK)
    if GRAD_KL_MODE == KL_REDUCED:
        # d(reduced KL)/d(element) is the reduction's scale: one scalar read, no host sync.
        grad_kl_scalar = tl.load(grad_kl_ptr).to(COMPUTE) / divisor
    if HAS_GRAD_Z:
        seed = tl.load(seed_ptr)
    for tile in range(pid, num_tiles, num_programs):
        if INT64:  # tl.cast, not .to(): under the interpreter the loop variable is a Python int
            offsets = tl.cast(tile, tl.int64) * BLOCK + lanes
        else:
            offsets = tile * BLOCK + lanes
        mask = offsets < n_elements
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
        grad_mu = tl.zeros([BLOCK], COMPUTE)
        grad_logvar = tl.zeros([BLOCK], COMPUTE)
        if HAS_GRAD_Z:
            # dz/dmu = 1, dz/dlogvar = 0.5 * std * eps (reparameterize_grad_logvar), with eps
            # drawn again exactly as the forward drew it: exact at any logvar, where 0.5 * (z - mu)
            # would lose std * eps to z's rounding when std is small next to mu.
            noise_index = _noise_index(offsets, channels, spatial, CHANNELS_LAST)
            eps = tl.randn(seed, noise_index).to(COMPUTE)  # philox_normal
            grad_z = tl.load(grad_z_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            grad_mu += grad_z
            grad_logvar += grad_z * (0.5 * tl.exp(0.5 * logvar) * eps)
        if GRAD_KL_MODE != KL_NONE:
            mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            if GRAD_KL_MODE == KL_ELEMENTWISE:
                grad_kl = tl.load(grad_kl_ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
            elif GRAD_KL_MODE == KL_PER_SAMPLE:
                # The gradient of the element's sample total: B values, gathered from cache.
                grad_kl = tl.load(grad_kl_ptr + offsets // sample_size, mask=mask, other=0.0).to(COMPUTE)
            else:
                grad_kl = grad_kl_scalar
            # kl_grad_mu = mu, kl_grad_logvar = 0.5 * (exp(logvar) - 1).
            grad_mu += grad_kl * mu
            grad_logvar += grad_kl * (0.5 * (tl.exp(logvar) - 1.0))
        tl.store(grad_mu_ptr + offsets, grad_mu.to(grad_mu_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_logvar_ptr + offsets, grad_logvar.to(grad_logvar_ptr.dtype.element_ty), mask=mask)


# True when TRITON_INTERPRET was set as triton built the kernels: they then run on CPU tensors.
INTERPRETED = isinstance(_reparameterize_kl_forward_kernel, InterpretedFunction)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _divisor(reduction: str, shape: torch.Size, numel: int) -> int:
    """The reduced KL is the sum divided by this: 1, the batch size or the element count."""
    if reduction == "sum":
        return 1
    if reduction == "batchmean":
        return shape[0]
    if reduction == "mean":
        return numel
    # The custom ops reach here without fastvae.ops' checks: an unknown reduction must not pass as "sum".
    raise ValueError(
        f"reduction must be 'sum', 'batchmean', 'mean', 'per_sample', 'none' or None, got {reduction!r}"
    )


# The host side of a launch is plain integer arithmetic on cached values: at small sizes it costs
# as much as the kernel (triton.cdiv and triton.next_power_of_2 are constexpr functions, a few
# microseconds a call).
@functools.lru_cache(maxsize=None)
def _max_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


@functools.lru_cache(maxsize=None)
def _reduction_width(device: torch.device) -> int:
    """MAX_PROGRAMS: REDUCTION_WIDTH, or the partials' count rounded up to a power of two if larger."""
    return max(REDUCTION_WIDTH, 1 << (_max_programs(device) - 1).bit_length())


def _grid(device: torch.device, numel: int) -> int:
    return min(-(-numel // BLOCK), _max_programs(device))


def _layout(t: torch.Tensor) -> tuple[torch.memory_format, bool, int, int]:
    """The memory format the kernels run in, and CHANNELS_LAST, channels and spatial for it.

    A channels-last (3d) input is read as it lies and gives channels-last outputs; anything else
    runs on contiguous copies.
    """
    memory_format = latent_memory_format(t)
    if memory_format == torch.contiguous_format or t.numel() == 0:
        return memory_format, False, 1, 1
    return memory_format, True, t.shape[1], t.numel() // (t.shape[0] * t.shape[1])


# One arrival counter per (device, stream) for eager launches: each reducing launch leaves it at
# zero, and launches on one stream never overlap, so it is allocated (and zeroed) once instead of
# every call.
_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def _capturing(device: torch.device) -> bool:
    """Whether launches on ``device``'s current stream are being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _outside_graph_pools(allocate):
    """What ``allocate()`` returns, allocated where no CUDA-graph memory pool can take it.

    A cached counter outlives the call that allocates it, so it must come from torch's general
    pool: a block of a graph's private pool is recycled behind the back of a module-level dict
    (cudagraph trees free and reassign their pool's blocks by their own bookkeeping), and a
    counter read back non-zero would keep every program from seeing itself last, the KL never
    written. torch routes allocations to a graph pool either by thread (cudagraph trees' warm-up
    in torch.compile(mode="reduce-overhead"), where no stream is capturing, and
    torch.cuda.use_mem_pool: ``_cuda_beginAllocateCurrentThreadToPool``) or by stream, when it is
    being captured (torch.cuda.graph). A thread of its own is on neither: its current stream is
    the device's default stream, which CUDA never captures. torch 2.11 has no way to ask whether
    the caller's allocations are routed, so the counter is never allocated by the caller.
    """
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(allocate).result()


def _counter(device: torch.device) -> torch.Tensor:
    """A zeroed arrival counter that no launch running at the same time can touch.

    A captured launch gets a counter of its own, allocated in the graph's private memory pool
    and zeroed by a memset node at each replay: the graph may replay on any stream, beside eager
    launches on the capture stream, and a shared per-stream counter would then count both.
    """
    if _capturing(device):
        return torch.zeros(1, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counter = _counters.get(key)
    if counter is None:
        # Zeroed here, on the stream that will use it: the allocating thread's stream is another.
        # The block is never freed, so the stream it was allocated on does not matter.
        counter = _outside_graph_pools(lambda: torch.empty(1, dtype=torch.int32, device=device)).zero_()
        _counters[key] = counter
    return counter


def _check_seed_device(seed: torch.Tensor | None, device: torch.device) -> None:
    # The kernels load the key through its pointer: a CPU tensor would be a bad address on a GPU.
    if seed is None or seed.device != device:
        got = "None" if seed is None else f"a tensor on {seed.device}"
        raise ValueError(f"the seed must be a 0-dim int64 tensor on the latents' device ({device}), got {got}")


# Reusable: entering it does nothing.
_STAY = contextlib.nullcontext()


def _on(device: torch.device):
    # Triton launches on the current CUDA device, which need not be the tensors' device. Switching
    # (torch.cuda.device's enter and exit) costs host time on every launch, so only when needed.
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _STAY
    return torch.cuda.device(device)


def _splits(batch: int, sample_size: int) -> int:
    """Programs per sample of a per-sample KL: a power of two (the final sum takes the partials as
    rows of SPLITS), at most one per tile, and at most PER_SAMPLE_PROGRAMS in all.

    It follows from the shape alone, never the GPU, so a sample's total has the same bits on
    every GPU model. A batch of PER_SAMPLE_PROGRAMS samples or more runs one program per sample.
    """
    limit = min(-(-sample_size // BLOCK), PER_SAMPLE_PROGRAMS // batch)
    return 1 << (limit.bit_length() - 1) if limit > 1 else 1


# Kernels Triton compiled, by launch key (_launch_key). Triton's JIT binds, types and specializes
# every argument of every launch before it finds the compiled kernel (about 10 us of host time a
# launch on a GPU host), then calls the kernel's launcher; a hit here calls the launcher directly
# (about 3 us). ``CompiledKernel[grid](*args)`` takes every argument in signature order,
# constexprs included (the launcher drops them), in triton 3.6 as in 3.8.
_compiled: dict[tuple, object] = {}


# Launch keys whose direct launch raised: they go through the JIT from then on.
_jit_keys: set[tuple] = set()


def _jit_only(kernel) -> bool:
    """Whether a launch of ``kernel`` must go through Triton's JIT even when its key has a kernel.

    JITFunction.run (triton 3.6 and 3.8) compiles another variant when debug is on (TRITON_DEBUG,
    ``knobs.runtime.debug`` or the kernel's own ``debug=``) or an instrumentation mode is
    (TRITON_INSTRUMENTATION_MODE), keys on a stages-inspection hook (3.8), and calls the
    kernel's pre-run hooks before every launch: a direct launch would skip all of these. The
    launch enter and exit hooks (proton, for one) are called on both paths.
    """
    return bool(
        knobs.runtime.debug
        or getattr(kernel, "debug", None)
        or knobs.compilation.instrumentation_mode
        or kernel.pre_run_hooks
        or getattr(knobs.runtime, "add_stages_inspection_hook", None) is not None
    )


def _launch_key(kernel, device: torch.device, tensors: tuple, ints: tuple, flags: tuple) -> tuple | None:
    """The key of a launch's compiled kernel (see _launch for the arguments), or None where only
    Triton's JIT can tell it.

    Triton specializes a launch on each pointer's dtype and 16-byte alignment, on each int's width,
    and on whether n_elements and sample_size (the ints outside ``do_not_specialize``) are 1 or
    multiples of 16; then on the constexprs, which follow from the dtypes and the host's ``flags``.
    Only launches whose pointers are all aligned (torch's allocations are) and whose ints are all
    int32 (none exceeds n_elements) get a key.
    """
    if ints[0] > _INT32_LIMIT or any(t.data_ptr() % 16 for t in tensors):
        return None
    return (kernel, device.index, *(t.dtype for t in tensors), *((n == 1, n % 16 == 0) for n in ints[:2]), *flags)


def _launch(kernel, grid: int, device: torch.device, tensors: tuple, ints: tuple, flags: tuple, constexprs: dict):
    """``kernel[(grid,)](*tensors, *ints, **constexprs)``: ``tensors`` are the kernel's seven
    pointers, ``ints`` its n_elements, sample_size, divisor, channels and spatial (both kernels
    take them in this order), ``flags`` what the host decided the constexprs from."""
    # Only CUDA launches have a compiled kernel to keep; the interpreter compiles nothing.
    key = _launch_key(kernel, device, tensors, ints, flags) if device.type == "cuda" else None
    _run(kernel, grid, key, (*tensors, *ints), constexprs)


def _run(kernel, grid: int, key: tuple | None, args: tuple, constexprs: dict) -> None:
    """Launches through the compiled kernel of ``key`` when there is one, else through the JIT.

    A direct launch that raises falls back to the JIT, for this launch and every later one of its
    key, with one warning per key. Running the kernel again is safe if the failed launch did run
    it: both kernels only write their outputs, and the reducing forward leaves its counter at zero.
    """
    if key is not None and (key in _jit_keys or _jit_only(kernel)):
        key = None
    compiled = _compiled.get(key)
    if compiled is not None:
        try:
            compiled[(grid, 1, 1)](*args, *constexprs.values())
            return
        except Exception as exc:
            del _compiled[key]
            _jit_keys.add(key)
            warnings.warn(
                f"fastvae: launching the compiled {kernel.fn.__name__} directly failed ({type(exc).__name__}: {exc}); "
                "launches of this variant go through Triton's JIT from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            key = None
    compiled = kernel[(grid,)](*args, **constexprs, num_warps=NUM_WARPS)
    if key is not None:
        _compiled[key] = compiled


def reparameterize_kl_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    seed: torch.Tensor | None,
    *,
    write_z: bool,
    reduction: str | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(z, kl)`` in one launch; ``z`` is None unless ``write_z``, ``kl`` None if ``reduction`` is.

    ``seed`` is the Philox key, a 0-dim int64 tensor on ``mu``'s device, read only when ``write_z``.
    """
    device, shape, numel = mu.device, mu.shape, mu.numel()
    # The host tests these bools, not kl_mode: comparing tl.constexprs costs microseconds.
    per_sample = reduction == "per_sample"
    reduced = reduction is not None and reduction != "none" and not per_sample
    divisor = _divisor(reduction, shape, numel) if reduced else 1
    acc_dtype = accumulate_dtype(mu.dtype)
    memory_format, channels_last, channels, spatial = _layout(mu)
    z = torch.empty(shape, dtype=mu.dtype, device=device, memory_format=memory_format) if write_z else None
    if reduction is None:
        kl_mode, kl = KL_NONE, None
    elif reduction == "none":
        kl = torch.empty(shape, dtype=acc_dtype, device=device, memory_format=memory_format)
        kl_mode = KL_ELEMENTWISE
    elif per_sample:
        kl_mode, kl = KL_PER_SAMPLE, torch.empty(shape[0], dtype=acc_dtype, device=device)
    else:
        kl_mode, kl = KL_REDUCED, torch.empty((), dtype=acc_dtype, device=device)
    if numel == 0:
        if reduced:
            # torch's convention for empty inputs: the sum is 0, and 0 / 0 (mean, batchmean of a
            # zero batch) is nan.
            kl = torch.full((), 0.0 if divisor else float("nan"), dtype=acc_dtype, device=device)
        elif per_sample:
            kl.zero_()  # samples of no elements total 0, as torch's sum over empty dims
        return z, kl
    if write_z:
        _check_seed_device(seed, device)

    mu, logvar = mu.contiguous(memory_format=memory_format), logvar.contiguous(memory_format=memory_format)
    if per_sample:
        sample_size = numel // shape[0]
        splits = _splits(shape[0], sample_size)
        grid = shape[0] * splits
    else:
        sample_size, splits = 1, 1
        grid = _grid(device, numel)
    # Per sample with one program a sample, each writes its total: no partials to sum.
    summed = reduced or splits > 1
    # Unused pointers still need a tensor of the right device; the constexpr flags keep the
    # kernel from touching them.
    partials = torch.empty(grid, dtype=acc_dtype, device=device) if summed else mu
    with _on(device):
        # Under _on: stream capture is a property of the current device's current stream.
        counter = _counter(device) if summed else mu
        tensors = (
            mu,
            logvar,
            z if z is not None else mu,
            kl if kl is not None else mu,
            partials,
            counter,
            seed if write_z else mu,
        )
        ints = (numel, sample_size, divisor, channels, spatial)
        flags = (write_z, reduction, channels_last, splits)
        _launch(_reparameterize_kl_forward_kernel, grid, device, tensors, ints, flags, {
            "WRITE_Z": write_z,
            "KL_MODE": kl_mode,
            "COMPUTE": _compute_dtype(mu.dtype),
            "CHANNELS_LAST": channels_last,
            "INT64": numel > _INT32_LIMIT,
            "BLOCK": BLOCK,
            "MAX_PROGRAMS": _reduction_width(device),
            "SPLITS": splits,
        })
    return z, kl


def reparameterize_kl_backward(
    grad_z: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    mu: torch.Tensor | None,
    logvar: torch.Tensor,
    seed: torch.Tensor | None,
    *,
    reduction: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_mu, grad_logvar)`` in one launch.

    ``mu`` is read only when ``grad_kl`` is given, ``seed`` (the forward's) only when ``grad_z``
    is. ``reduction`` is the forward's, and says how ``grad_kl`` is shaped.
    """
    device, shape, numel = logvar.device, logvar.shape, logvar.numel()
    per_sample = grad_kl is not None and reduction == "per_sample"
    reduced = grad_kl is not None and reduction != "none" and not per_sample
    divisor = _divisor(reduction, shape, numel) if reduced else 1
    memory_format, channels_last, channels, spatial = _layout(logvar)
    grad_mu = torch.empty(shape, dtype=logvar.dtype, device=device, memory_format=memory_format)
    grad_logvar = torch.empty(shape, dtype=logvar.dtype, device=device, memory_format=memory_format)
    if numel == 0:
        return grad_mu, grad_logvar
    if grad_z is not None:
        _check_seed_device(seed, device)

    def laid_out(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=memory_format)

    if grad_kl is None:
        grad_kl_mode = KL_NONE
    elif reduced:
        grad_kl_mode = KL_REDUCED
    elif per_sample:
        # (B,), often expanded from a later sum's gradient (stride 0).
        grad_kl_mode, grad_kl = KL_PER_SAMPLE, grad_kl.contiguous()
    else:
        grad_kl_mode, grad_kl = KL_ELEMENTWISE, laid_out(grad_kl)
    logvar = laid_out(logvar)
    sample_size = numel // shape[0] if per_sample else 1
    tensors = (
        laid_out(grad_z) if grad_z is not None else logvar,
        grad_kl if grad_kl is not None else logvar,
        laid_out(mu) if grad_kl is not None else logvar,
        logvar,
        grad_mu,
        grad_logvar,
        seed if grad_z is not None else logvar,
    )
    ints = (numel, sample_size, divisor, channels, spatial)
    flags = (grad_z is not None, grad_kl is not None and reduction, channels_last)
    with _on(device):
        _launch(_reparameterize_kl_backward_kernel, _grid(device, numel), device, tensors, ints, flags, {
            "HAS_GRAD_Z": grad_z is not None,
            "GRAD_KL_MODE": grad_kl_mode,
            "COMPUTE": _compute_dtype(logvar.dtype),
            "CHANNELS_LAST": channels_last,
            "INT64": numel > _INT32_LIMIT,
            "BLOCK": BLOCK,
        })
    return grad_mu, grad_logvar
