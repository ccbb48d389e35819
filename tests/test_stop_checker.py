"""StopChecker: stop strings across token boundaries, held-back partial matches, token stops, min_new_tokens."""
from server.sampling_params import SamplingParams
from server.stop_checker import StopChecker


def feed(checker, deltas):
    out, decision = [], None
    for i, d in enumerate(deltas, 1):
        decision = checker.check_text(d, i)
        out.append(decision.text_delta)
        if decision.finish_reason:
            break
    return out, decision


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    c = StopChecker(SamplingParams(stop=("STOP",), max_new_tokens=100), (2,))
    out, d = feed(c, ["hello S", "T", "O", "P and more"])
    assert (d.finish_reason, d.stop_reason) == ("stop", "STOP")
    assert out == ["hello ", "", "", ""] and "".join(out) == "hello "


def test_with_include_stop_str_in_output_the_match_stays_and_only_what_follows_is_cut():
    c = StopChecker(SamplingParams(stop=("STOP",), max_new_tokens=100, include_stop_str_in_output=True), (2,))
    out, d = feed(c, ["hello S", "T", "O", "P and more"])
    assert (d.finish_reason, d.stop_reason) == ("stop", "STOP") and out == ["hello ", "", "", "STOP"]


def test_false_alarm_prefix_is_released_later():
    c = StopChecker(SamplingParams(stop=("STOP",), max_new_tokens=100), (2,))
    out, d = feed(c, ["a ST", "x", "b"])
    assert d.finish_reason is None and out == ["a ", "STx", "b"]


def test_earliest_of_several_stop_strings_wins():
    c = StopChecker(SamplingParams(stop=("world", "lo w"), max_new_tokens=100), (2,))
    out, d = feed(c, ["hello world"])
    assert d.stop_reason == "lo w" and "".join(out) == "hel"


def test_length_releases_held_text():
    c = StopChecker(SamplingParams(stop=("STOP",), max_new_tokens=2), (2,))
    out, d = feed(c, ["x", "ST"])
    assert d.finish_reason == "length" and "".join(out) == "xST"


def test_token_stops_and_min_new_tokens():
    p = SamplingParams(stop_token_ids=(7,), min_new_tokens=2, max_new_tokens=10)
    c = StopChecker(p, (2,))
    assert c.check_token(2, 1) is None and c.check_token(7, 2) is None  # below min_new_tokens
    assert (c.check_token(7, 3).finish_reason, c.check_token(7, 3).stop_reason) == ("stop", 7)
    assert c.check_token(2, 3).finish_reason == "eos_token"
    c = StopChecker(SamplingParams(ignore_eos=True), (2,))
    assert c.check_token(2, 5) is None


def test_stop_strings_wait_for_min_new_tokens():
    c = StopChecker(SamplingParams(stop=("a",), min_new_tokens=2, max_new_tokens=10), (2,))
    out, d = feed(c, ["a", "ba"])
    assert d.finish_reason == "stop" and "".join(out) == "ab"


def test_a_stop_written_under_min_new_tokens_stays_suppressed_whatever_the_other_stops():
    """"ab" lies whole in the first token, written under min_new_tokens: it never ends the sequence, and a
    longer unrelated stop string must not widen the search back over it."""
    results = []
    for stops in (("ab",), ("ab", "zzzz")):
        c = StopChecker(SamplingParams(stop=stops, min_new_tokens=2, max_new_tokens=3), (2,))
        out, d = feed(c, ["ab", "x", "y"])
        results.append(("".join(out), d.finish_reason))
    assert results == [("abxy", "length")] * 2
