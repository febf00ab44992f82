import random

from lorapipe.data.records import Record
from lorapipe.data.split import split_records


def _records(n):
    return [Record("f", i + 1, "", "prompt_completion",
                   messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}])
            for i in range(n)]


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


def _labelled(n, label_every=None, group_of=None):
    out = []
    for i in range(n):
        r = Record("f.jsonl", i + 1, "", "prompt_completion",
                   messages=[{"role": "user", "content": f"text {i}"}, {"role": "assistant", "content": f"c{i}"}])
        if label_every:
            r.label = "pos" if i % label_every == 0 else "neg"
        if group_of:
            r.group = str(i // group_of)
        out.append(r)
    return out


def test_group_key_keeps_a_conversations_rows_in_one_split():
    recs = _labelled(300, group_of=5)
    splits = split_records(recs, 0.2, 0.2)
    where = {}
    for s in splits:
        for r in s.records:
            where.setdefault(r.group, set()).add(s.name)
    assert all(len(names) == 1 for names in where.values())
    assert all(len(s) > 0 for s in splits)


def test_stratification_keeps_label_proportions():
    recs = _labelled(1000, label_every=10)  # 10% positive
    train, evals, test = split_records(recs, 0.1, 0.2)
    for ds, expected in ((train, 700), (evals, 100), (test, 200)):
        pos = sum(r.label == "pos" for r in ds.records)
        assert abs(len(ds) - expected) <= 2
        assert pos == round(len(ds) * 0.1) or abs(pos / len(ds) - 0.1) < 0.01


def test_train_valid_test_files_are_honoured(tmp_path):
    recs = []
    for name, n in (("train.jsonl", 20), ("valid.jsonl", 5), ("test.jsonl", 4)):
        for i in range(n):
            recs.append(Record(str(tmp_path / name), i + 1, "", "text", text=f"{name} {i}"))
    train, evals, test = split_records(recs, 0.3, 0.3)
    assert (len(train), len(evals), len(test)) == (20, 5, 4)
    assert {r.source.split("/")[-1] for r in evals.records} == {"valid.jsonl"}


def test_preference_rows_of_one_prompt_never_straddle_splits():
    """Several pairs (or KTO's rated answers) for one prompt: a test prompt the model was trained on would score its
    memory, not its preference, so every row of a prompt lands in one split."""
    recs = []
    for i in range(400):
        prompt = [{"role": "user", "content": f"question {i % 100}"}]
        if i % 2:
            recs.append(Record("p.jsonl", i + 1, "", "preference", messages=prompt,
                               chosen=[{"role": "assistant", "content": f"good {i}"}],
                               rejected=[{"role": "assistant", "content": f"bad {i}"}]))
        else:
            recs.append(Record("p.jsonl", i + 1, "", "unpaired", messages=prompt,
                               chosen=[{"role": "assistant", "content": f"rated {i}"}], desirable=bool(i % 4)))
    splits = split_records(recs, 0.2, 0.2)
    where: dict[str, set[str]] = {}
    for s in splits:
        for r in s.records:
            where.setdefault(r.prompt_key(), set()).add(s.name)
    assert len(where) == 100 and all(len(names) == 1 for names in where.values())
    assert all(len(s) > 0 for s in splits) and sum(len(s) for s in splits) == 400
