"""Durations in progress lines."""
from minigpt.training import format_duration


def test_durations_read_at_a_glance():
    assert format_duration(45.4) == "45s"
    assert format_duration(59.6) == "1m00s"      # rounded before the unit is chosen
    assert format_duration(192) == "3m12s"
    assert format_duration(7500) == "2h05m"
