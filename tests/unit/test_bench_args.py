"""launch/bench.py's arguments: bad sequence lists are one line naming the flag."""
import pytest

from distil_scale.errors import UserError
from distil_scale.tools.bench import parse_seqs


def test_sequence_lists():
    assert parse_seqs("128,512") == [128, 512]
    for bad, msg in [("0,abc", "not a comma-separated list"), ("128,", "not a comma-separated"),
                     ("0", "16 or more"), ("8,128", "16 or more")]:
        with pytest.raises(UserError, match=msg) as e:
            parse_seqs(bad)
        assert str(e.value).startswith("--seq: ") and "\n" not in str(e.value)
