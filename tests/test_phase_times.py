"""PhaseTimes: the packed phases of a result behave as the dict they replace."""

from __future__ import annotations

import pytest

from probe.models import Outcome, Phase, ProbeResult
from probe.trace import PhaseTimes


@pytest.mark.parametrize(
    "phases",
    [
        {},
        {Phase.CONNECT: 0.031},
        {Phase.RESOLVE: 0.0, Phase.TLS: 1e-05, Phase.TRANSFER: 2.5},
        {Phase.TRANSFER: 0.4, Phase.RESOLVE: 0.001, Phase.CONNECT: 0.02, Phase.PROCESSING: 0.1, Phase.TLS: 0.05},
    ],
    ids=["none", "connect-only", "gaps", "all-out-of-order"],
)
def test_packed_phases_equal_the_dict_they_were_made_from(phases: dict[Phase, float]) -> None:
    packed = PhaseTimes(phases)
    assert packed == phases
    assert dict(packed) == phases
    assert len(packed) == len(phases)
    assert list(packed) == [p for p in Phase if p in phases]  # always in phase order
    for p in Phase:
        assert (p in packed) == (p in phases)
        assert packed.get(p) == phases.get(p)


def test_missing_phase_is_a_key_error() -> None:
    packed = PhaseTimes({Phase.CONNECT: 0.5})
    with pytest.raises(KeyError):
        packed[Phase.TLS]
    assert packed.get("nonsense") is None  # type: ignore[call-overload]


def test_a_result_with_packed_phases_serializes_as_before() -> None:
    phases = {Phase.RESOLVE: 0.004, Phase.CONNECT: 0.061}
    plain = ProbeResult("t", "direct", Outcome.OK, 1.0, 0.1, phases=phases)
    packed = ProbeResult("t", "direct", Outcome.OK, 1.0, 0.1, phases=PhaseTimes(phases))
    assert packed.to_json() == plain.to_json()
    assert packed == plain
