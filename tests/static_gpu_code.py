"""Reads the GPU machine code that the build produces, with no GPU: the facts docs/gpu.md claims.

For each kernel, from its SASS (``cuobjdump -sass``) and resource usage (``cuobjdump -res-usage``):
the width and number of its global loads and stores, its registers, stack and local memory.
The CUDA kernels come from the built ``fastvae._C`` (CI builds it with CUDA forced); the Triton
kernels are compiled here, one cubin per launch variant that tests/triton_launches.py records,
specialized as Triton's JIT specializes a launch on tensors from torch's caching allocator.

``python tests/static_gpu_code.py triton`` prints the Triton kernels' facts as JSON (it must run
without TRITON_INTERPRET, so tests/test_static_gpu_code.py runs it in a subprocess).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set in CI: a static check that cannot run fails instead of skipping.
REQUIRE_ENV = "FASTVAE_REQUIRE_STATIC_CHECKS"
ARCH = 90
# A 128-bit global access in SASS: LDG.E.128, LDG.E.128.CONSTANT, STG.E.128, ...
_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")


def require_static_checks(reason: str):
    """Skips with ``reason``; fails instead where FASTVAE_REQUIRE_STATIC_CHECKS=1 (CI)."""
    import pytest

    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: this check must run here)")
    pytest.skip(reason)


def find_tool(name: str) -> str:
    """A CUDA binary tool: from PATH, the CUDA toolkit setup.py finds, or the copy triton carries."""
    found = shutil.which(name)
    if found:
        return found
    candidates = []
    sys.path.insert(0, ROOT)
    try:
        import setup

        cuda_home = setup.find_cuda_home()
        if cuda_home:
            candidates.append(os.path.join(cuda_home, "bin", name))
    finally:
        sys.path.remove(ROOT)
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    require_static_checks(f"{name} not found on PATH, in the CUDA toolkit or in triton's package")
    raise AssertionError("unreachable")


@dataclass
class Kernel:
    name: str  # demangled where c++filt exists
    registers: int
    stack_bytes: int
    local_bytes: int
    # Global loads and stores by access width in bits: {"LDG": {128: 2, 32: 1}, "STG": {...}}
    accesses: dict
    # Per loop of the SASS (a backward branch's target to the branch): its global accesses as above.
    loops: list


def _count_accesses(lines: list[str]) -> dict:
    accesses: dict = {}
    for line in lines:
        for op, modifiers in _GLOBAL.findall(line):
            by_width = accesses.setdefault(op, {})
            bits = _access_bits(modifiers)
            by_width[bits] = by_width.get(bits, 0) + 1
    return accesses


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _loops(body: str) -> list[dict]:
    """The loops of one kernel's SASS: each backward branch and what it spans, with the global
    accesses there. Branch targets are addresses (``BRA 0x560``) or labels (``BRA `(.L_x_3)``),
    as cuobjdump versions print them."""
    code, labels, pending = [], {}, []
    for line in body.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = _INSTRUCTION.search(line)
        if instruction:
            address = int(instruction.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            code.append((address, instruction.group(2)))
    loops = []
    for address, text in code:
        branch = re.search(r"\bBRA\s+(?:`\((\.L_x_\d+)\)|0x([0-9a-f]+))", text)
        if branch is None:
            continue
        target = labels.get(branch.group(1)) if branch.group(1) else int(branch.group(2), 16)
        if target is not None and target <= address:
            loops.append({"accesses": _count_accesses([t for a, t in code if target <= a <= address])})
    return loops


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _access_bits(modifiers: str) -> int:
    for width in ("128", "64", "U16", "S16", "16", "U8", "S8", "8"):
        if f".{width}" in modifiers + ".":
            return int(re.sub(r"\D", "", width))
    return 32


def kernels_in(binary: str, arch: int = ARCH) -> list[Kernel]:
    """Every kernel of ``arch`` in an object, cubin or shared library, read with cuobjdump."""
    cuobjdump = find_tool("cuobjdump")
    arch_flag = [] if binary.endswith(".cubin") else ["-arch", f"sm_{arch}"]
    sass = subprocess.run([cuobjdump, "-sass", *arch_flag, binary], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "-res-usage", *arch_flag, binary], capture_output=True, text=True, check=True).stdout
    resources = {
        m.group(1): {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", m.group(2))}
        for m in re.finditer(r"Function (\S+?):?\s*\n\s*(REG:.*)", usage)
    }
    bodies = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)[1:]
    mangled = bodies[0::2]
    kernels = []
    for name, demangled, body in zip(mangled, _demangle(mangled), bodies[1::2]):
        r = resources.get(name, {})
        kernels.append(Kernel(
            demangled, r.get("REG", -1), r.get("STACK", -1), r.get("LOCAL", -1),
            _count_accesses(body.splitlines()), _loops(body),
        ))
    return kernels


def _top_level_split(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses and angle brackets."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += char in "(<"
        depth -= char in ")>"
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    return terms + [current.strip()]


def launch_bounds(source: str, kernel: str, template_args: list[str] = ()) -> tuple[int, int]:
    """(max threads, min blocks per SM) of ``__launch_bounds__`` on ``kernel`` in CUDA ``source``,
    its constants resolved from the file's ``constexpr`` definitions. A bound that depends on the
    dtypes, ``kMinBlocksPerSm<image_t, latent_t>``, is kMinBlocksFloat64 for the instantiations
    whose ``template_args`` hold a double, else kMinBlocks."""
    constants = {
        name: int(value)
        for name, value in re.findall(r"constexpr\s+(?:int|int64_t|int32_t|unsigned)\s+(\w+)\s*=\s*(\d+)\s*;", source)
    }
    match = re.search(r"__launch_bounds__\(((?:[^()]|\([^()]*\))*)\)\s*" + kernel + r"\s*\(", source)
    assert match, f"no __launch_bounds__ on {kernel}"
    values = []
    for term in _top_level_split(match.group(1)):
        if term.startswith("kMinBlocksPerSm<"):
            values.append(constants["kMinBlocksFloat64" if "double" in template_args else "kMinBlocks"])
            continue
        expression = re.sub(r"\b([A-Za-z_]\w*)\b", lambda m: str(constants[m.group(1)]), term)
        values.append(int(eval(expression, {"__builtins__": {}})))  # digits and operators only
    return values[0], values[1] if len(values) > 1 else 1


def register_budget(threads: int, min_blocks: int, registers_per_sm: int = 65536, per_thread_max: int = 255) -> int:
    """Registers a thread may use so that ``min_blocks`` blocks of ``threads`` fit on one SM (sm_80/90)."""
    return min(per_thread_max, registers_per_sm // (threads * min_blocks))


# --- Triton: compile each recorded launch as the JIT would on a GPU, and read its cubin ---------

@dataclass
class TritonVariant:
    kernel: str
    dtype: str
    constexprs: dict
    num_warps: int
    elements_per_thread: int
    element_bytes: int
    facts: dict


def _compile_triton(job):
    import triton
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import triton_launches

    (name, signature, constexprs, options), divisible_names = job
    fn = getattr(triton_launches.kernels, name)
    # The JIT marks a pointer 16-byte aligned (all of torch's fresh allocations are) and an int
    # divisible by 16 when it is: "tt.divisibility" 16, which is what lets it vectorize.
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in divisible_names}
    compiled = triton.compile(
        ASTSource(fn, dict(signature), dict(constexprs), attrs),
        target=triton_launches.TARGETS[[t.arch for t in triton_launches.TARGETS].index(ARCH)],
        options=dict(options),
    )
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{name}.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        (kernel,) = kernels_in(path)
        ptx = os.path.join(folder, f"{name}.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        spills = sum(ptxas_spills(ptx, f"sm_{ARCH}a").values())
    return {**asdict(kernel), "spill_bytes": spills}


def ptxas_spills(ptx: str, arch: str) -> dict[str, int]:
    """Bytes of spill stores plus spill loads that ptxas reports, per kernel of the PTX file.

    The SASS alone cannot tell a spill from an array placed in local memory on purpose (sin and
    cos keep one for the rare huge argument), so ask the assembler.
    """
    report = subprocess.run([find_tool("ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                            capture_output=True, text=True, check=True).stderr
    found = re.findall(
        r"Function properties for (\S+)\s*\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads", report
    )
    assert found, report
    names = _demangle([name for name, _, _ in found])
    return {name: int(stores) + int(loads) for name, (_, stores, loads) in zip(names, found)}


def spills_in(binary: str, arch: int = ARCH) -> dict[str, int]:
    """ptxas's spills per kernel, from the sm_``arch`` PTX embedded in ``binary`` (``+PTX`` builds)."""
    cuobjdump = find_tool("cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([cuobjdump, "-xptx", "all", os.path.abspath(binary)], cwd=folder,
                       capture_output=True, text=True, check=True)
        ptx = glob.glob(os.path.join(folder, f"*.sm_{arch}.ptx"))
        if not ptx:
            require_static_checks(f"{binary} holds no sm_{arch} PTX (build with TORCH_CUDA_ARCH_LIST ending in +PTX)")
        spills: dict[str, int] = {}
        for path in ptx:
            spills.update(ptxas_spills(path, f"sm_{arch}"))
    return spills


def triton_variants() -> list[TritonVariant]:
    """Each distinct launch (int32 offsets) compiled for sm_90 with aligned tensors and
    an element count (and a per-sample size) divisible by 16, as for a 128x128 latent."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import triton_launches

    chosen, jobs = [], []
    for launch in triton_launches.record_launches():
        variant = triton_launches._variant(launch)
        name, signature, constexprs, options = variant
        types = dict(signature)
        if dict(constexprs).get("INT64") or variant in [c[0] for c in chosen]:
            continue
        kernel, args, _ = launch
        logvar = dict(zip(kernel.arg_names, args))["logvar_ptr"]  # both kernels read it, in the latent dtype
        divisible = [a for a, t in signature if t.startswith("*")] + [
            a for a in ("n_elements", "sample_size") if types.get(a, "").startswith("i")
        ]
        chosen.append((variant, logvar.dtype.itemsize, dict(options)["num_warps"]))
        jobs.append((variant, divisible))
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(_compile_triton, jobs))
    variants = []
    for (variant, itemsize, warps), facts in zip(chosen, results):
        name, signature, constexprs, _ = variant
        c = dict(constexprs)
        variants.append(TritonVariant(
            name, dict(signature)["logvar_ptr"], {k: str(v) for k, v in c.items()}, warps,
            c["BLOCK"] // (32 * warps), itemsize, facts,
        ))
    return variants


def built_extension() -> str | None:
    """The built fastvae._C shared library, or None."""
    found = glob.glob(os.path.join(ROOT, "fastvae", "_C*.so"))
    if found:
        return found[0]
    try:
        import fastvae._C as ext
    except ImportError:
        return None
    return ext.__file__


if __name__ == "__main__":
    if sys.argv[1:] != ["triton"]:
        sys.exit("usage: python tests/static_gpu_code.py triton")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("static_gpu_code: unset TRITON_INTERPRET")
    print(json.dumps([asdict(v) for v in triton_variants()]))
