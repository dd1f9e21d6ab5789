"""tools/device_check.sh's stage limits: the sum its summary states is the sum of the limits it sets."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run only when the prebuilt extension fails (build) or with DEVICE_CHECK_COMPILE_TESTS (the compile rows and tests)
NOT_IN_A_PLAIN_RUN = {"build", "extension_after_build", "bench_train_compile", "pytest_compile"}


def test_the_stated_limit_sum_is_the_limits_sum():
    with open(os.path.join(ROOT, "tools", "device_check.sh")) as f:
        text = f.read()
    limits = {}
    for name, limit in re.findall(r"^\s*stage (\w+) (\d+) ", text, re.M):
        assert limits.setdefault(name, int(limit)) == int(limit), f"{name}: the CPU and CUDA forms differ"
    smoke = re.findall(r"^limit=\$\(fit (\d+)\)", text, re.M)  # the eight smoke runs share one limit
    assert len(smoke) == 1
    total = sum(v for k, v in limits.items() if k not in NOT_IN_A_PLAIN_RUN) + int(smoke[0])
    stated = re.search(r"^LIMITS_SUM=(\d+)", text, re.M)
    assert stated and int(stated.group(1)) == total
    budget = re.search(r"DEVICE_CHECK_BUDGET:-(\d+)", text)
    assert int(budget.group(1)) <= 570  # the device tool's 600 s per command, less packing and transfer
    assert {"pytest_cuda", "numerics", "bench_train", "profile", "bench_kernels_conv"} <= set(limits)
