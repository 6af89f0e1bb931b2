"""The machine a command runs on (minigpt/device.py): the device and dtype, the memory
checks, and the OpenMP wait policy that train, generate, inspect-heads and eval pick
before torch loads: spinning threads on idle cores, sleeping ones on busy cores, a
user's choice kept."""

from __future__ import annotations

import pytest

from minigpt import device
from minigpt.errors import MinigptError

STAT = """cpu  {u0} 0 {s0} {i0} 0 0 0 0 0 0
cpu0 {u0} 0 {s0} {i0} 0 0 0 0 0 0
cpu1 {u1} 0 10 {i1} {w1} 0 0 {st1} 0 0
intr 12345
"""


def _stat(tmp_path, **ticks):
    path = tmp_path / "stat"
    path.write_text(STAT.format(**ticks))
    return path


def test_idle_cores_counts_idle_and_iowait_ticks_of_this_process_cpus(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "_usable_cpus", lambda: [0, 1])
    stat = _stat(tmp_path, u0=100, s0=10, i0=1000, u1=100, i1=1000, w1=5, st1=0)
    later = STAT.format(u0=100, s0=10, i0=1020, u1=105, i1=1000, w1=10, st1=10)

    def sleep(seconds):  # 20 ticks pass: cpu0 idle; cpu1 5 busy, 5 iowait, 10 stolen
        stat.write_text(later)

    monkeypatch.setattr(device.time, "sleep", sleep)
    assert device.idle_cores(stat=stat) == pytest.approx(1.25)


def test_without_proc_stat_idle_cores_are_the_cpus_less_the_load_average(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "_usable_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(device.os, "getloadavg", lambda: (1.5, 1.0, 0.5), raising=False)
    assert device.idle_cores(stat=tmp_path / "missing") == pytest.approx(2.5)


def test_idle_cores_is_none_without_proc_stat_or_a_load_average(tmp_path, monkeypatch):
    monkeypatch.delattr(device.os, "getloadavg", raising=False)
    assert device.idle_cores(stat=tmp_path / "missing") is None


def test_torch_threads_counts_physical_cores_not_hyperthreads(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "_usable_cpus", lambda: [0, 1, 2, 3])
    for cpu, core in enumerate([0, 1, 0, 1]):  # cpu2 and cpu3 are cpu0's and cpu1's siblings
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text(f"{core}\n")
        (topology / "physical_package_id").write_text("0\n")
    assert device.torch_threads(topology=tmp_path) == 2


@pytest.mark.parametrize(
    ("text", "cpus"), [("200000 100000\n", 2.0), ("max 100000\n", float("inf")), ("", float("inf"))]
)
def test_cgroup_cpus_reads_a_v2_quota(tmp_path, text, cpus):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    assert device.cgroup_cpus(cpu_max) == cpus


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core machine without a CPU quota; its idle cores are the test's to set."""
    monkeypatch.setattr(device, "torch_threads", lambda: 2)
    monkeypatch.setattr(device, "cgroup_cpus", lambda: float("inf"))

    def idle(value):
        monkeypatch.setattr(device, "idle_cores", lambda: value)

    return idle


@pytest.mark.parametrize(
    ("idle", "policy"), [(2.0, "default"), (1.6, "default"), (1.0, "PASSIVE"), (None, "PASSIVE")]
)
def test_threads_sleep_only_when_the_cores_are_busy_or_unknown(two_cores, idle, policy):
    two_cores(idle)
    environ = {}
    assert device.choose_wait_policy(environ=environ) == policy
    assert environ == ({} if policy == "default" else {"OMP_WAIT_POLICY": "PASSIVE"})


def test_a_users_wait_policy_is_kept(two_cores):
    two_cores(0.0)
    environ = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert device.choose_wait_policy(environ=environ) == "ACTIVE"
    assert environ == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_ddp_processes_sharing_the_cores_sleep(two_cores):
    two_cores(2.0)
    environ = {"LOCAL_WORLD_SIZE": "2"}
    assert device.choose_wait_policy(environ=environ) == "PASSIVE"


def test_a_cpu_quota_below_the_thread_count_sleeps(two_cores, monkeypatch):
    two_cores(2.0)  # the host looks idle, but the container may use one CPU
    monkeypatch.setattr(device, "cgroup_cpus", lambda: 1.0)
    assert device.choose_wait_policy(environ={}) == "PASSIVE"


def test_one_thread_never_waits_for_a_sibling(monkeypatch):
    monkeypatch.setattr(device, "torch_threads", lambda: 1)
    monkeypatch.setattr(device, "cgroup_cpus", lambda: float("inf"))
    monkeypatch.setattr(device, "idle_cores", lambda: pytest.fail("no need to watch the cores"))
    assert device.choose_wait_policy(environ={}) == "default"


def test_a_thread_count_given_is_the_one_that_must_find_free_cores(two_cores):
    two_cores(1.0)  # one of two cores idle: enough for `generate --threads 1`, not for 2
    assert device.choose_wait_policy(1, environ={}) == "default"
    assert device.choose_wait_policy(2, environ={}) == "PASSIVE"


def test_omp_num_threads_is_the_count_that_must_find_free_cores(two_cores):
    two_cores(1.0)
    assert device.choose_wait_policy(environ={"OMP_NUM_THREADS": "1"}) == "default"
    assert device.choose_wait_policy(environ={"OMP_NUM_THREADS": "x"}) == "PASSIVE"  # torch's 2


def test_an_unreadable_proc_stat_line_reads_as_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(device, "_usable_cpus", lambda: [0])
    stat = tmp_path / "stat"
    stat.write_text("\ncpu0 1 2 3 x 5 6 7 8\n")
    assert device._cpu_ticks(stat, {"cpu0"}) == {}


def test_the_device_named_is_the_device_used():
    import torch

    assert device.resolve_device("cpu") == torch.device("cpu")
    assert device.process_device("cpu", local_rank=1) == torch.device("cpu")  # not a GPU's
    with pytest.raises(MinigptError, match="unknown device 'warp9'"):
        device.resolve_device("warp9")


def test_autocast_is_bfloat16_only_where_asked_or_supported():
    import torch

    cpu = torch.device("cpu")
    assert device.autocast_dtype("float32", cpu) is None
    assert device.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert device.autocast_dtype("auto", cpu) is None  # auto: CUDA with bf16 only


def test_a_training_run_too_big_for_memory_is_refused_before_allocating():
    import torch

    from minigpt.model import GPTConfig

    with pytest.raises(MinigptError, match=r"training a model of .* needs at least"):
        device.check_training_memory(GPTConfig(n_layer=10**9), 8, torch.device("cpu"))
    device.check_training_memory(GPTConfig(), 8, torch.device("cpu"))  # fits: no error


def test_the_memory_refusal_names_the_vocab_only_once_the_tokenizer_gives_it():
    import torch

    from minigpt.model import GPTConfig

    cpu = torch.device("cpu")
    with pytest.raises(MinigptError) as err:  # before the data: no vocab size yet
        device.check_training_memory(GPTConfig(n_embd=200_000, vocab_size=0), 16, cpu)
    assert ", ctx 128, vocab not yet known (at least 1.92e+12 parameters)" in str(err.value)
    assert "vocab 1 " not in str(err.value)
    with pytest.raises(MinigptError) as err:  # the tokenizer's 53 tokens
        device.check_training_memory(GPTConfig(vocab_size=53), 10**8, cpu)
    assert ", ctx 128, vocab 53 (" in str(err.value)
