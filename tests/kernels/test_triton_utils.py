"""Host-side helpers of the kernels: the plain-integer `cdiv` / `next_power_of_2` agree with triton's."""

import math

import pytest

from fat5_kernels.triton_utils import cdiv, next_power_of_2


def test_cdiv_is_ceiling_division():
    for a in range(0, 300):
        for b in range(1, 70):
            assert cdiv(a, b) == math.ceil(a / b)


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 768, 1024, 1025, 32128)] == [
        1, 1, 2, 4, 4, 8, 1024, 1024, 2048, 32768
    ]  # fmt: skip


def test_same_values_as_triton():
    triton = pytest.importorskip("triton")
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 200) for b in range(1, 40))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
