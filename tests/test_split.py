import random

from lorapipe.data.formats import Record
from lorapipe.data.split import split_records


def _records(n):
    return [Record("f", i + 1, "", "prompt_completion", messages=[{"role": "user", "content": f"q{i}"},
                                                                  {"role": "assistant", "content": f"a{i}"}]) for i in range(n)]


def _keys(ds):
    return sorted(r.content_key() for r in ds.records)


def test_split_is_deterministic_and_stable_under_reordering():
    recs = _records(400)
    a = split_records(recs, 0.1, 0.1)
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    b = split_records(shuffled, 0.1, 0.1)
    for x, y in zip(a, b):
        assert _keys(x) == _keys(y) and x.fingerprint != ""
    assert 20 < len(a[1]) < 60 and 20 < len(a[2]) < 60
    assert sum(len(x) for x in a) == 400


def test_duplicates_never_straddle_splits_and_other_rows_do_not_move():
    recs = _records(300)
    dup = Record("g", 9, "", "prompt_completion", messages=[{"role": "user", "content": " q5 "},
                                                            {"role": "assistant", "content": "a5"}])
    splits = split_records(recs + [dup], 0.2, 0.2)
    holder = [s for s in splits if recs[5].content_key() in _keys(s)]
    assert len(holder) == 1 and _keys(holder[0]).count(recs[5].content_key()) == 2
    before = split_records(recs, 0.2, 0.2)
    fewer = split_records(recs[:-50], 0.2, 0.2)
    for x, y in zip(before, fewer):
        assert set(_keys(y)) <= set(_keys(x))


def test_salt_draws_another_split():
    recs = _records(200)
    assert _keys(split_records(recs, 0.2, 0.2, "a")[2]) != _keys(split_records(recs, 0.2, 0.2, "b")[2])
