"""bench/gpu_check.py, the first GPU session's script: its runner keeps going after a failed or
timed-out step, and its dry run works here (CI also runs the whole dry run: `.ci/run`)."""

import ast
import glob
import json
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def _step(name, code, timeout_s=30):
    return gpu_check.Step(name, [sys.executable, "-c", code], timeout_s, {"GPU_CHECK_TEST": "1"}, None)


def test_a_step_that_fails_or_hangs_is_reported_and_ended(tmp_path):
    failing = _step("fails", "raise SystemExit(3)")
    hanging = _step("hangs", "import time; time.sleep(60)")
    env = _step("env", "import os; print('GPU_CHECK_TEST=' + os.environ['GPU_CHECK_TEST'])")
    with open(tmp_path / "log", "w") as log:
        failed = gpu_check._run(failing, failing.command, 30, log)
        start = time.monotonic()
        hung = gpu_check._run(hanging, hanging.command, 1, log)
        elapsed = time.monotonic() - start
        passed = gpu_check._run(env, env.command, 30, log)
    assert failed[0] == "failed (exit 3)"
    assert hung[0] == "timed out after 1 s" and elapsed < 30
    assert passed[0] == "ok"
    text = (tmp_path / "log").read_text()
    assert "===== hangs: timed out after 1 s" in text
    assert "GPU_CHECK_TEST=1" in text and "===== env: ok" in text


def test_every_step_has_a_timeout_within_the_budget_and_its_files_exist():
    steps = gpu_check.steps(cores=16)
    names = [s.name for s in steps]
    # What a GPU session needs most first: the numbers, then the suite, the sanitizers last.
    assert names == ["env", "build", "probe", "bench", "profile", "host", "tests", "train", "warm", "memcheck",
                     "racecheck", "synccheck"]
    # Every step gets its whole limit within the budget.
    assert sum(s.timeout_s for s in steps) <= gpu_check.BUDGET_S
    assert gpu_check.BUDGET_S + gpu_check.INTERRUPT_GRACE_S <= 8 * 60
    build = steps[names.index("build")]
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["MAX_JOBS"] == "16"
    assert "--no-index" in build.command  # no network on the GPU machine
    assert "-v" in build.command  # the log keeps the compile and link commands
    assert steps[names.index("bench")].command[-2:] == ["--bench-scope", "core"]
    for step in steps:
        assert 0 < step.timeout_s <= 300
        for arg in step.command + (step.dry_command or []):
            if arg.endswith(".py"):
                assert os.path.isfile(os.path.join(ROOT, arg)), f"{step.name}: {arg} does not exist"


def test_the_bench_step_times_the_training_step():
    from fastvae.benchmarks.scopes import cases

    core = cases(torch.device("cuda"), "core")
    assert {c.op for c in core} == {"reparameterize_kl", "vae_loss", "train_step"}


def test_triton_compiles_the_sanitized_kernels_before_the_sanitizers():
    steps = {s.name: s for s in gpu_check.steps(cores=16)}
    warm, memcheck = steps["warm"], steps["memcheck"]
    smoke = memcheck.command[memcheck.command.index(gpu_check.PY):]
    # The same run, allocator setting included (pointer alignment is part of a kernel's key).
    assert warm.command == smoke and warm.env == memcheck.env


def test_the_tests_over_2_31_elements_run_one_at_a_time(monkeypatch):
    monkeypatch.setattr(gpu_check, "_has_module", lambda name: True)
    tests = {s.name: s for s in gpu_check.steps(cores=16)}["tests"].command
    assert tests[tests.index("--dist") + 1] == "loadgroup"
    # Each test that checks the free GPU memory is in the group, and gives its memory back.
    found = 0
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            if any(isinstance(n, ast.Attribute) and n.attr == "mem_get_info" for n in ast.walk(node)):
                found += 1
                decorators = [ast.unparse(d) for d in node.decorator_list]
                assert "pytest.mark.xdist_group('over_2_31_elements')" in decorators, (path, node.name)
                assert "gpu_memory_freed_after" in [a.arg for a in node.args.args], (path, node.name)
    assert found


def test_a_step_ending_early_leaves_its_time_to_the_next_and_none_takes_more(tmp_path, monkeypatch):
    plan = [
        _step("quick", "pass", timeout_s=20),
        _step("sleeper", "import time; time.sleep(3)", timeout_s=1),  # on the time quick left
        _step("hog", "import time; time.sleep(60)", timeout_s=1),  # on what is left of 21 s
        _step("after", "pass", timeout_s=20),
    ]
    monkeypatch.setattr(gpu_check, "steps", lambda cores: plan)
    start = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert time.monotonic() - start < 21 + gpu_check.INTERRUPT_GRACE_S + 10
    summary = (tmp_path / "summary.md").read_text()
    assert "| sleeper | ok |" in summary and "| after | ok |" in summary
    assert re.search(r"\| hog \| timed out after 1[0-9] s \|", summary), summary


def test_the_summary_is_written_after_every_step(tmp_path, monkeypatch):
    # The second step reads the summary as a killed run would leave it.
    summary = tmp_path / "summary.md"
    check = (f"text = open({str(summary)!r}).read(); "
             "assert '| first | ok |' in text and '| second | pending |' in text and '| third | pending |' in text")
    plan = [_step("first", "pass"), _step("second", check), _step("third", "pass")]
    monkeypatch.setattr(gpu_check, "steps", lambda cores: plan)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "| second | ok |" in summary.read_text() and "| third | ok |" in summary.read_text()


def test_dry_run_writes_a_summary_with_each_steps_result(tmp_path):
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "build", "probe", "racecheck"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| build | ok |" in summary, summary
    # The probe runs for real on the CPU, and its verdict is the step's one-line result.
    assert re.search(r"\| probe \| ok \| \d+ \| exception probe: (\d+) of \1 cases raised as they should \|", summary), summary
    assert "| racecheck | dry run: needs a GPU, command printed |" in summary
    assert code == 0
    assert (tmp_path / "gpu-check.log").is_file()


def test_the_summary_carries_the_benchmark_table(tmp_path):
    from fastvae.benchmarks.measure import Row
    from fastvae.benchmarks.report import write_results

    rows = [Row("vae_loss", method, "fwd+bwd", "256x3x64x64", 3 << 16, median, 4 << 20)
            for method, median in (("eager", 4e-4), ("fused", 1e-4))]
    path = tmp_path / "nvidia-h200.json"
    write_results(str(path), rows, 4.25e12, {"device": "NVIDIA H200", "command": "pytest bench"})
    table = gpu_check._benchmark_table([str(path)])
    assert table.startswith("NVIDIA H200, `pytest bench`, 2 cases")
    assert re.search(r"vae_loss .* fused .* 100\.0 us +4\.00x", table), table
    assert gpu_check._benchmark_table([]) == "No benchmark results were written."


def test_a_benchmark_run_killed_part_way_keeps_the_cases_it_timed(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "FASTVAE_BENCH_RESULTS": str(results), "FASTVAE_BENCH_BUDGET_S": "0.02"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/bench_reparameterize_kl.py",
               "--benchmark", "--bench-scope", "core", "-k", "eager"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(results.glob("*.json")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()
    finally:
        process.wait()
    written = list(results.glob("*.json"))
    assert len(written) == 1, f"no results after {command}"
    rows = json.loads(written[0].read_text())["rows"]
    assert rows and all(row["op"] == "reparameterize_kl" and row["method"] == "eager" for row in rows)


def test_the_gpu_machine_quirks_are_handled():
    steps = {s.name: s for s in gpu_check.steps(cores=16)}
    # No venv there: pip must be let into a Python marked externally managed.
    assert steps["build"].env["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    # A pooled allocation hides an out-of-bounds access from memcheck.
    assert steps["memcheck"].env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    tests = steps["tests"].command
    assert "--continue-on-collection-errors" in tests
    ignored = [tests[i + 1] for i, arg in enumerate(tests) if arg == "--ignore"]
    assert sorted(ignored) == sorted(gpu_check.CPU_ONLY_TESTS)
    for path in ignored:
        assert os.path.isfile(os.path.join(ROOT, path)), path
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        # The suite's GPU cases come from conftest's device lists, or ask for CUDA themselves.
        assert not re.search(r"^from conftest import .*DEVICES|torch\.cuda\.is_available\(\)", text, re.M), path


def test_a_tool_off_path_is_found_in_the_toolkit(tmp_path, monkeypatch):
    # A toolkit as setup.find_cuda_home recognises one, holding the tool in its bin.
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    tool = tmp_path / "bin" / "compute-sanitizer"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert gpu_check.find_tool("compute-sanitizer") == str(tool)
    tool.unlink()
    assert gpu_check.find_tool("compute-sanitizer") == "compute-sanitizer"
