"""The window protocol: gold windows, the scored-once invariant, and lm-eval's rolling windows."""

import pytest

from lmeval.core.windows import Chunks, make_chunk_windows, make_windows, window_spans


def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len=1):
    """lm-evaluation-harness's `get_rolling_token_windows` + `make_disjoint_window`, copied
    verbatim in substance (lm_eval/utils.py, MIT) as the oracle for S = L."""
    if not token_list:
        return
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def disjoint(pair):
    """lm-eval's `make_disjoint_window`: (context, continuation) with no overlap."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def model_input(context, continuation):
    """lm-eval feeds (context + continuation)[:-1] and scores the continuation."""
    return (list(context) + list(continuation))[:-1], list(continuation)


def test_gold_windows_docstring_example():
    t = list(range(100, 110))
    w = make_windows(0, t, [1], max_length=4, stride=4)
    assert [x.input_ids for x in w] == [(1, 100, 101, 102), (103, 104, 105, 106), (105, 106, 107, 108)]
    assert [x.positions for x in w] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
    assert [x.targets for x in w] == [(100, 101, 102, 103), (104, 105, 106, 107), (108, 109)]
    assert [x.context_len for x in w] == [(1, 2, 3, 4), (1, 2, 3, 4), (3, 4)]


def test_gold_windows_with_stride():
    t = list(range(10, 17))  # n = 7, L = 4, S = 2
    w = make_windows(0, t, [1], max_length=4, stride=2)
    assert [x.input_ids for x in w] == [(1, 10), (1, 10, 11, 12), (11, 12, 13, 14), (12, 13, 14, 15)]
    assert [x.positions for x in w] == [(0, 1), (2, 3), (4, 5), (6,)]
    assert [x.context_len for x in w] == [(1, 2), (3, 4), (3, 4), (4,)]


def test_no_prefix_leaves_first_token_unscored():
    w = make_windows(0, [5, 6, 7, 8], [], max_length=2, stride=2)
    assert [x.positions for x in w] == [(1, 2), (3,)]
    assert [x.input_ids for x in w] == [(5, 6), (6, 7)]
    assert make_windows(0, [5], [], 4, 4) == []
    assert make_windows(0, [], [1], 4, 4) == []


@pytest.mark.parametrize("n", range(23))
@pytest.mark.parametrize("max_length, stride", [(1, 1), (2, 1), (3, 3), (4, 1), (4, 3), (5, 5), (8, 3)])
@pytest.mark.parametrize("prefix", [[], [0]])
def test_every_token_scored_once_with_context_at_most_L(n, max_length, stride, prefix):
    t = list(range(1, n + 1))
    windows = make_windows(0, t, prefix, max_length, stride)
    positions = [p for w in windows for p in w.positions]
    assert positions == list(range(1 - len(prefix), n)) if n else positions == []
    s = prefix + t
    for w in windows:
        assert 1 <= len(w.input_ids) <= max_length
        assert w.n_scored <= stride
        for pos, target, ctx in zip(w.positions, w.targets, w.context_len):
            assert target == t[pos]
            assert 1 <= ctx <= max_length
            # context is exactly the ids before the target, ending right before it
            j = pos + len(prefix)
            assert w.input_ids[:ctx] == tuple(s[j - ctx : j])
            # as much context as L allows, at least L - S once past the first window
            assert ctx == min(j, max_length) or ctx >= max_length - stride + 1


@pytest.mark.parametrize("n", [1, 2, 5, 7, 8, 9, 16, 17, 31])
@pytest.mark.parametrize("max_length", [1, 2, 4, 8])
def test_stride_equal_length_is_lm_eval_rolling(n, max_length):
    t = list(range(100, 100 + n))
    ours = [(list(w.input_ids), list(w.targets)) for w in make_windows(0, t, [7], max_length, max_length)]
    theirs = [disjoint(p) for p in lm_eval_rolling_windows(t, 7, max_length)]
    assert ours == [model_input(a, b) for a, b in theirs]


@pytest.mark.parametrize("max_length, stride", [(0, 1), (4, 0), (4, 5)])
def test_bad_window_arguments(max_length, stride):
    with pytest.raises(ValueError, match="must be"):
        window_spans(10, max_length, stride)


# --------------------------------------------------------------------------------------
# Chunks (the GPTQ and llama.cpp presets)
# --------------------------------------------------------------------------------------


def test_chunks_gold_windows():
    """The docstring's drawing: L = 4, context 2, a BOS prefix, ten tokens."""
    t = list(range(10, 20))
    windows = make_chunk_windows(0, t, [0], 4, Chunks(context=2))
    assert [w.input_ids for w in windows] == [(0, 10, 11), (13, 14, 15)]
    assert [w.targets for w in windows] == [(11, 12), (15, 16)]
    assert [w.positions for w in windows] == [(1, 2), (5, 6)]
    assert [w.context_len for w in windows] == [(2, 3), (2, 3)]
    # llama.cpp at n_ctx = 6 without a prefix, each chunk's first id replaced by BOS (id 0)
    windows = make_chunk_windows(0, t, [], 6, Chunks(context="half", bos=0))
    assert [w.input_ids for w in windows] == [(0, 11, 12, 13, 14)]  # one chunk of 6; 4 ids dropped
    assert [w.targets for w in windows] == [(14, 15)] and [w.positions for w in windows] == [(4, 5)]


@pytest.mark.parametrize("length, context", [(2, 1), (5, 1), (5, 4), (8, "half"), (9, "half")])
@pytest.mark.parametrize("n, prefix", [(0, []), (1, [7]), (23, [7]), (24, []), (40, [7])])
def test_chunks_score_each_token_at_most_once_and_only_in_whole_chunks(length, context, n, prefix):
    t = list(range(100, 100 + n))
    s = prefix + t
    windows = make_chunk_windows(3, t, prefix, length, Chunks(context=context))
    c = length // 2 + 1 if context == "half" else context
    assert len(windows) == len(s) // length
    scored = [p for w in windows for p in w.positions]
    assert scored == sorted(set(scored))
    assert len(scored) == len(windows) * (length - c)
    for i, w in enumerate(windows):
        assert list(w.input_ids) == s[i * length : (i + 1) * length - 1]
        assert [s[p + len(prefix)] for p in w.positions] == list(w.targets)
        assert w.n_scored == len(w.targets) == length - c


def test_chunk_context_out_of_range_is_named():
    with pytest.raises(ValueError, match="chunk_context"):
        Chunks(context=4).context_for(4)
